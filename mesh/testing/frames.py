"""A frame factory for sans-IO tests of the broker core (`mesh.testing.frames`).

Builds the multipart frames clients and nodes send (without any socket), feeds them
to a `Broker`, and decodes what the broker returns. Frame shapes follow
`mesh.broker.core`:

  client -> broker   [header, payload]
  broker -> node     [envelope, header, payload]   envelope = the client's identity
  node -> broker     [envelope, header, payload]   envelope = b"" for the node's own commands
                                                   and events
  broker -> subscribers [topic frame, header, payload]   from `take_published()`

No socket and no clock: a test hands each frame list to the core with the `now` it
chooses, so every routing decision is reproducible.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..broker import Broker, Outgoing, Side
from ..protocol import (
    ErrorInfo,
    Header,
    MeshError,
    MessageType,
    command,
    decode_header,
    decode_payload,
    encode_header,
    encode_payload,
    error_to,
    event,
    response_to,
)

__all__ = [
    "CLIENT",
    "CLIENT_B",
    "NODE_A",
    "NODE_B",
    "command_frames",
    "registration",
    "register",
    "system",
    "node_system",
    "reply",
    "error_reply",
    "header_of",
    "payload_of",
    "error_of",
    "only",
    "published",
    "event_frames",
    "to_clients",
    "to_nodes",
    "dispatched_ids",
]

CLIENT = b"client-1"
CLIENT_B = b"client-2"
NODE_A = b"node-a"
NODE_B = b"node-b"


def command_frames(
    service: str,
    action: str,
    *,
    id: str | None = None,
    now: float = 0.0,
    deadline: float | None = None,
    payload: Any = None,
) -> list[bytes]:
    """The two frames a client sends for a command: [header, payload]."""
    header = command(service, action, now=now, deadline=deadline, id=id)
    return [encode_header(header), encode_payload(payload)]


def event_frames(topic: str, body: Any = None, *, id: str = "e1", now: float = 0.0) -> list[bytes]:
    """A client's event: [header, payload] (a node sends [b"", header, payload])."""
    return [encode_header(event(topic, now=now, id=id)), encode_payload(body)]


def registration(
    services: Mapping[str, Iterable[str]] | Mapping[str, Mapping[str, Mapping[str, Any]]],
    *,
    capacity: int = 1,
    name: str = "test-node",
    heartbeat_interval: float = 60.0,
) -> dict[str, Any]:
    """A `mesh.register` payload.

    Args:
        services: service -> action names, or service -> {action: spec} for full specs.
        capacity: how many commands the node runs at once.
        name: the node's display name.
        heartbeat_interval: long by default, so tests that skip heartbeats keep their node.
    """
    out: dict[str, Any] = {}
    for svc, actions in services.items():
        if isinstance(actions, Mapping):
            specs = {act: dict(spec) for act, spec in actions.items()}
        else:
            specs = {act: {"description": f"{svc}.{act}", "schema": {}} for act in actions}
        out[svc] = {"actions": specs}
    return {"name": name, "capacity": capacity, "heartbeat_interval": heartbeat_interval, "services": out}


def node_system(action: str, payload: Any = None, *, now: float = 0.0, id: str | None = None) -> list[bytes]:
    """A node's own `mesh.<action>` command: [b"", header, payload]."""
    return [b"", *command_frames("mesh", action, id=id, now=now, payload=payload)]


def register(
    broker: Broker,
    ident: bytes,
    services: Mapping[str, Any],
    *,
    capacity: int = 1,
    now: float = 0.0,
    name: str | None = None,
) -> list[Outgoing]:
    """Register node `ident` with `services` through `mesh.register`; asserts success."""
    payload = registration(services, capacity=capacity, name=name or ident.decode())
    out = broker.node_message(ident, node_system("register", payload, now=now), now)
    assert out, "mesh.register got no answer"
    side, to, frames = out[0]
    assert (side, to) == (Side.NODE, ident)
    assert frames[0] == b""
    h = decode_header(frames[1])
    assert h.type is MessageType.RESPONSE, h.error
    return out[1:]


def system(broker: Broker, ident: bytes, action: str, payload: Any = None, *, now: float = 0.0) -> tuple[Header, Any]:
    """A client's `mesh.<action>` command; returns the decoded (header, payload) of the answer."""
    frames = command_frames("mesh", action, now=now, payload=payload)
    side, to, out = only(broker.client_message(ident, frames, now))
    assert (side, to) == (Side.CLIENT, ident)
    return decode_header(out[0]), decode_payload(out[1])


def reply(dispatch: Sequence[bytes], result: Any = None, *, now: float = 0.0) -> list[bytes]:
    """A node's response to a dispatched command: [envelope, header, payload]."""
    envelope, hframe, _ = dispatch
    header = response_to(decode_header(hframe), now=now)
    return [envelope, encode_header(header), encode_payload(result)]


def error_reply(dispatch: Sequence[bytes], err: MeshError, *, now: float = 0.0) -> list[bytes]:
    """A node's error answer to a dispatched command: [envelope, header, nil]."""
    envelope, hframe, _ = dispatch
    return [envelope, encode_header(error_to(decode_header(hframe), err, now=now)), b"\xc0"]


def header_of(frames: Sequence[bytes]) -> Header:
    """The decoded header of a two-frame client message or a three-frame node message."""
    return decode_header(frames[-2])


def payload_of(frames: Sequence[bytes]) -> Any:
    return decode_payload(frames[-1])


def error_of(frames: Sequence[bytes]) -> ErrorInfo:
    """The error an `error` message reports; fails the test if it is not an error."""
    h = header_of(frames)
    assert h.type is MessageType.ERROR, f"expected an error, got {h.type}"
    assert h.error is not None
    return h.error


def only(out: list[Outgoing]) -> Outgoing:
    """The single message in `out`."""
    assert len(out) == 1, f"expected one message, got {len(out)}: {out!r}"
    return out[0]


def published(broker: Broker) -> list[tuple[bytes, Header, Any]]:
    """What `broker` has published since last asked: (frame 0, header, payload) of each."""
    return [(f[0], decode_header(f[1]), decode_payload(f[2])) for f in broker.take_published()]


def to_clients(out: Iterable[Outgoing]) -> list[Outgoing]:
    return [o for o in out if o[0] is Side.CLIENT]


def to_nodes(out: Iterable[Outgoing]) -> list[Outgoing]:
    return [o for o in out if o[0] is Side.NODE]


def dispatched_ids(out: Iterable[Outgoing]) -> list[str]:
    """Command ids of the dispatches (to nodes, with a client envelope) in `out`."""
    return [decode_header(f[1]).id for s, _, f in out if s is Side.NODE and f[0]]
