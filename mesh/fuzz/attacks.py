"""What each attacker sends: message number `index` of attacker `who` in run `seed`.

Rules of this module:

* `shot(seed, who, index, now, ...)` is a pure function: it draws from its own
  `random.Random(f"{seed}/{who}/{index}")`, so any one message of a run is rebuilt from
  the seed, the attacker and its number (`python -m mesh.fuzz show`), whatever was
  received or sent before it. Only `now` (timestamps) and the token differ between runs.
* Answers to commands the broker dispatches to the node attacker come from another
  stream (`answer`), numbered by arrival, so they never shift the unsolicited sequence.
* Each attacker mixes valid messages from the corpus (to reach deep code), structural
  and byte mutations of them, and the hostile classes attackers have used (issue 15).
* Sizes stay under `Limits`: a run on a small shared machine stays bounded.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ..protocol import MAX_HEADER_BYTES, MAX_MESSAGE_BYTES, encode_payload
from . import corpus
from .mutate import (
    DEEP,
    deep_array,
    hostile_msgpack,
    hostile_value,
    many_maps,
    mutate_bytes,
    mutate_frames,
    mutate_value,
    pack,
)

__all__ = ["Who", "Via", "Shot", "Limits", "Seal", "shot", "answer", "hostile_registration"]

# Seals a wire map and payload the way the attacker's credentials say (adds the token).
Seal = Callable[[dict[str, Any], bytes, float], tuple[bytes, bytes]]


class Who(StrEnum):
    """The attackers of a run."""

    CLIENT = "client"  # an admitted client key with its valid (reader) token, reading replies
    DEAF = "deaf"  # the same credentials on another link that never reads a reply
    NODE = "node"  # an admitted node key (the kv node's) on the node port
    EVENTS = "events"  # the admitted client key on the events port (subscriptions)
    STRANGER = "stranger"  # no admitted key: plain sockets and CURVE with an unknown key


class Via(StrEnum):
    """The socket a shot goes out on."""

    CLIENT = "client"
    DEAF = "deaf"
    NODE = "node"
    EVENTS = "events"
    PLAIN_CLIENTS = "plain-clients"
    UNKNOWN_KEY_CLIENTS = "unknown-key-clients"
    PLAIN_NODES = "plain-nodes"
    UNKNOWN_KEY_NODES = "unknown-key-nodes"
    PLAIN_EVENTS = "plain-events"


@dataclass(frozen=True, slots=True)
class Limits:
    """Sizes a run may send: `message` is the broker's limit; `frame` what libzmq lets in
    (2x the limit plus a header: frames between the two must get MESSAGE_TOO_LARGE)."""

    message: int = MAX_MESSAGE_BYTES
    filter: int = 100_000  # longest subscription filter

    @property
    def frame(self) -> int:
        return 2 * self.message + MAX_HEADER_BYTES - 64


@dataclass(frozen=True, slots=True)
class Shot:
    """One message to send: on which socket, its frames, and which generator made it."""

    who: Who
    index: int
    via: Via
    kind: str
    frames: list[bytes]
    reconnect: bool = False  # open a new socket (a new handshake) before sending

    def hex(self, limit: int = 256) -> list[str]:
        """The frames as hex, each cut to `limit` bytes (with its full length said)."""
        return [f.hex() if len(f) <= limit else f"{f[:limit].hex()}...({len(f)} bytes)" for f in self.frames]


def _plain(wire: dict[str, Any], payload: bytes, now: float) -> tuple[bytes, bytes]:
    return pack(wire), payload


# An attacker's message maker: the socket, the kind, the frames, and (strangers only) a new handshake first.
_Maker = Callable[
    [random.Random, float, Seal, Limits, str | None],
    tuple[Via, str, list[bytes]] | tuple[Via, str, list[bytes], bool],
]


def shot(seed: int, who: Who, index: int, now: float, seal: Seal = _plain, limits: Limits = Limits()) -> Shot:
    """Message `index` of attacker `who` (see the module rules).

    Args:
        seed: the run's seed.
        who: the attacker.
        index: its message number, from 0.
        now: the time to stamp (the broker refuses messages more than 10 s off).
        seal: adds the attacker's token (the identity for strangers, who have none).
        limits: the sizes to stay under.
    """
    rng = random.Random(f"{seed}/{who}/{index}")
    # Every maker draws its message id first, so the previous message's id is known here.
    earlier = corpus.new_fuzz_id(random.Random(f"{seed}/{who}/{index - 1}")) if index else None
    makers: dict[Who, _Maker] = {
        Who.CLIENT: _client, Who.DEAF: _deaf, Who.NODE: _node, Who.EVENTS: _events, Who.STRANGER: _stranger
    }
    return Shot(who, index, *makers[who](rng, now, seal, limits, earlier))


def _client(rng: random.Random, now: float, seal: Seal, limits: Limits, earlier: str | None) -> tuple[Via, str, list[bytes]]:
    id = corpus.new_fuzz_id(rng)
    wire, payload = corpus.client_message(rng, now, id, earlier)
    kind = f"{wire['type']}:{wire.get('service', wire.get('topic', ''))}.{wire.get('action', '')}"
    header, payload = seal(wire, payload, now)
    pick = rng.random()
    if pick < 0.35:
        return Via.CLIENT, f"valid {kind}", [header, payload]
    return Via.CLIENT, *_mutated(rng, pick, header, payload, kind, limits, id)


def _mutated(
    rng: random.Random, pick: float, header: bytes, payload: bytes, kind: str, limits: Limits, id: str, prefix: tuple[bytes, ...] = ()
) -> tuple[str, list[bytes]]:
    """A sealed message changed one way; `pick` (from 0.35 to 1) chooses how."""
    wire = corpus.unpack_wire(header)
    if pick < 0.55:
        return f"structure {kind}", [*prefix, pack(mutate_value(rng, wire), rng), payload]
    if pick < 0.65:
        return f"bytes {kind}", [*prefix, mutate_bytes(rng, header, MAX_HEADER_BYTES * 2), payload]
    if pick < 0.75:
        return f"hostile-header {kind}", [*prefix, hostile_msgpack(rng, rng.choice([MAX_HEADER_BYTES, limits.frame]), id), payload]
    if pick < 0.83:
        return f"hostile-payload {kind}", [*prefix, header, _hostile_payload(rng, limits)]
    if pick < 0.89:
        return f"frames {kind}", mutate_frames(rng, [*prefix, header, payload], limits.frame)
    if pick < 0.94:
        wire["security"] = {**wire.get("security", {}), "level": 3,
                            "signature": rng.choice([b"", rng.randbytes(63), rng.randbytes(64), rng.randbytes(65)])}
        return f"signature {kind}", [*prefix, pack(wire), payload]
    wire["metadata"] = _odd_metadata(rng)
    return f"metadata {kind}", [*prefix, pack(wire), payload]


def _hostile_payload(rng: random.Random, limits: Limits) -> bytes:
    pick = rng.random()
    if pick < 0.15:
        return many_maps(rng.choice([10_000, limits.message - 64, limits.frame - 64]))
    if pick < 0.3:
        return deep_array(rng.choice([DEEP, 100_000]))
    if pick < 0.6:
        return hostile_msgpack(rng, limits.message)
    return pack(hostile_value(rng), rng)


def _odd_metadata(rng: random.Random) -> Any:
    return rng.choice([
        {f"k{i}": i for i in range(rng.choice([64, 65, 1000]))},
        {"x": "y" * 15_000},
        {"nested": [[[[{"a": None}]]]] * 50},
        {1: "int key"},
        ["not", "a", "map"],
        {"": None, "\x00": b"\xff"},
    ])  # fmt: skip


def _deaf(rng: random.Random, now: float, seal: Seal, limits: Limits, earlier: str | None) -> tuple[Via, str, list[bytes]]:
    """Commands and replay requests on a link that never reads (its replies pile up)."""
    id = corpus.new_fuzz_id(rng)
    service, action, body = rng.choice([("mesh", "replay", {"prefix": "", "after": 0}), ("echo", "echo", {"text": "x"}),
                                        ("mesh", "services", None), ("mesh", "ping", None)])
    wire = corpus.unpack_wire(corpus.encode_command(service, action, id, now))
    header, payload = seal(wire, encode_payload(body), now)
    return Via.DEAF, f"unread {service}.{action}", [header, payload]


def _node(rng: random.Random, now: float, seal: Seal, limits: Limits, earlier: str | None) -> tuple[Via, str, list[bytes]]:
    id = corpus.new_fuzz_id(rng)
    pick = rng.random()
    if pick < 0.12:
        return Via.NODE, "hostile-registration", [b"", corpus.encode_command("mesh", "register", id, now), hostile_registration(rng, limits)]
    if pick < 0.14:  # an event naming a service but no action (a reply to it once had no id)
        wire = corpus.unpack_wire(corpus.encode_event_header(rng.choice(corpus.TOPICS), id=id, now=now))
        wire["service"] = "kv"
        return Via.NODE, "event-with-service", [b"", pack(wire), encode_payload({"n": 1})]
    if pick < 0.2:  # a reply for a command this node was never sent
        wire, payload = corpus.reply_to(rng, {"id": corpus.new_fuzz_id(rng)}, now, id)
        return Via.NODE, f"stray {wire['type']}", [rng.randbytes(rng.choice([0, 5, 16])) or b"c", pack(wire), payload]
    wire, payload = corpus.node_control(rng, now, id)
    kind = f"{wire['type']}:{wire.get('service', wire.get('topic', ''))}.{wire.get('action', '')}"
    header = pack(wire)
    if pick < 0.6:
        return Via.NODE, f"valid {kind}", [b"", header, payload]
    return Via.NODE, *_mutated(rng, 0.35 + (pick - 0.6) * 1.625, header, payload, kind, limits, id, (b"",))


def hostile_registration(rng: random.Random, limits: Limits) -> bytes:
    """A `mesh.register` payload for the kv node, broken one of the ways attackers used:
    non-string service or action keys, schemas with $ref cycles, wrong types or a size
    near the limit, a payload of empty maps, or a structural mutation."""
    reg = corpus.registration(rng)
    actions = reg["services"]["kv"]["actions"]
    spec = next(iter(actions.values()))
    pick = rng.randrange(8)
    if pick == 0:
        reg["services"] = {1: reg["services"]["kv"], "kv": reg["services"]["kv"]}  # a non-string service key
    elif pick == 1:
        reg["services"] = {b"kv": reg["services"]["kv"], None: {}}
    elif pick == 2:
        spec["schema"] = {"$ref": "#", "definitions": {"a": {"$ref": "#/definitions/a"}}}
    elif pick == 3:
        spec["schema"] = {"type": 12, "properties": [], "required": {"x": 1}}
    elif pick == 4:
        spec["schema"] = {"description": "s" * (limits.message - 4096)}
    elif pick == 5:
        return many_maps(rng.choice([100_000, limits.message - 64, limits.frame - 64]))
    elif pick == 6:
        actions[rng.choice([2, 2.5, b"get", (1,)])] = spec
    else:
        reg = mutate_value(rng, reg)
    return pack(reg, rng)


def _events(rng: random.Random, now: float, seal: Seal, limits: Limits, earlier: str | None) -> tuple[Via, str, list[bytes]]:
    frames = corpus.subscription_frames(rng, limits.filter)
    return Via.EVENTS, f"upstream {frames[0][:1].hex() or 'empty'} {sum(map(len, frames))}B", frames


def _stranger(rng: random.Random, now: float, seal: Seal, limits: Limits, earlier: str | None) -> tuple[Via, str, list[bytes], bool]:
    """Someone without an admitted key: valid-looking messages with a forged token."""
    via = rng.choice([Via.PLAIN_CLIENTS, Via.UNKNOWN_KEY_CLIENTS, Via.PLAIN_NODES, Via.UNKNOWN_KEY_NODES, Via.PLAIN_EVENTS])
    reconnect = rng.random() < 0.05
    if via is Via.PLAIN_EVENTS:
        return via, "upstream", corpus.subscription_frames(rng, 1000), reconnect
    id = corpus.new_fuzz_id(rng)
    wire, payload = corpus.client_message(rng, now, id)
    wire["security"] = {"level": 1, "token": "eyJhbGciOiJub25lIn0.eyJzdWIiOiJkZXYiLCJyb2xlcyI6WyJhZG1pbiJdfQ."}
    frames = [pack(wire), payload]
    if via in (Via.PLAIN_NODES, Via.UNKNOWN_KEY_NODES):
        frames = [b"", *frames]
    return via, f"unauthenticated {wire['type']}", frames, reconnect


def answer(seed: int, number: int, dispatched: list[bytes], now: float) -> list[list[bytes]]:
    """What the node attacker sends back for the `number`th command dispatched to it
    (`dispatched` is [envelope, header, payload]): a good reply, none, a broken one, two."""
    rng = random.Random(f"{seed}/answer/{number}")
    if len(dispatched) != 3:
        return []
    envelope = dispatched[0]
    command = corpus.peek_wire(dispatched[1])
    id = corpus.new_fuzz_id(rng)
    wire, payload = corpus.reply_to(rng, command, now, id)
    good = [envelope, pack(wire), payload]
    pick = rng.random()
    if pick < 0.6:
        return [good]
    if pick < 0.7:
        return []  # never answered: the broker must answer the client at the deadline
    if pick < 0.8:
        return [good, [envelope, pack({**wire, "id": corpus.new_fuzz_id(rng)}), payload]]
    if pick < 0.9:
        return [[envelope, pack(mutate_value(rng, wire), rng), payload]]
    return [[envelope, mutate_bytes(rng, good[1], MAX_HEADER_BYTES), _hostile_payload(rng, Limits())]]

