"""What the parts of the broker's core share: message shapes, per-peer and per-command
state, and the few pure helpers that build replies.

Nothing here decides anything; `commands`, `nodes`, `system` and `replicated` do, and
`broker` composes them.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Final

from ...protocol import (
    CommandState,
    MeshError,
    encode_header,
    encode_payload,
    encode_response_header,
    error_header,
    peek_header,
    unpack_header,
)
from ...protocol.names import ID_MATCH
from ...security.gate import Gate, Peer
from ..registry import NodeInfo

if TYPE_CHECKING:  # for annotations only: the core does not load jwt or sqlite3
    from ...security.revocations import Revocations
    from ...security.tokens import TokenIssuer

__all__ = ["Side", "Outgoing", "BrokerSecurity", "ConnectionState", "Command", "Emit"]

NOBODY: Final = Peer()


class Side(IntEnum):
    """Which of the broker's two sockets a message comes from or goes to."""

    CLIENT = 0
    NODE = 1


Outgoing = tuple[Side, bytes, list[bytes]]
Emit = Callable[[str, dict[str, Any], float], None]  # publish a `mesh.*` event (topic, body, now)


@dataclass(slots=True)
class BrokerSecurity:
    """What a broker needs when security is on: the gate, and what renews and revokes tokens."""

    gate: Gate
    issuer: TokenIssuer | None = None  # for mesh.renew
    revocations: Revocations | None = None  # for mesh.revoke
    renew_ttl: float = 3600.0


@dataclass(slots=True)
class ConnectionState:
    """The seed's ProtocolState, kept per connected client and node.

    `pending_commands` holds command ids for a client, and (client, id) keys for a node:
    the replies that node still owes, which is what its capacity is counted against.
    """

    is_connected: bool = True
    last_message_id: str | None = None
    pending_commands: set[Any] = field(default_factory=set)
    message_count: int = 0
    last_activity: float = 0.0
    unread: deque[str] = field(default_factory=deque)  # nonces of large answers not acknowledged


@dataclass(slots=True)
class Command:
    """A command the broker accepted, until it is answered (`state` says where it is)."""

    client: bytes
    id: str
    service: str
    action: str
    header: bytes
    payload: bytes
    deadline: float
    received_at: float
    state: CommandState = CommandState.RECEIVED
    node: NodeInfo | None = None
    once: str | None = None  # the cluster-wide key of an exactly-once command
    sender: bytes = b""  # with security on: the client's CURVE key name, told to the node


def error_frames(err: MeshError, now: float, correlation_id: str | None) -> list[bytes]:
    """The `[header, payload]` of an error reply naming `correlation_id`."""
    return [encode_header(error_header(err, now=now, correlation_id=correlation_id)), b"\xc0"]


def to_peer(side: Side, ident: bytes, frames: list[bytes]) -> Outgoing:
    """A reply on `side`: a node's messages start with an empty envelope (the broker's own)."""
    return (side, ident, [b"", *frames] if side is Side.NODE else frames)


def event_ack(side: Side, ident: bytes, header: dict[str, Any], seq: int, now: float) -> Outgoing:
    """A publisher's acknowledgement: its event's sequence number."""
    return to_peer(side, ident, [encode_response_header(header, now), encode_payload({"seq": seq})])


def error_code(header: dict[str, Any]) -> int:
    """The code of a node's reply: 0 for a response (or an error without its body)."""
    return header["error"]["code"] if header["type"] == "error" and "error" in header else 0


def ran_on(cmd: Command, ident: bytes) -> bool:
    """Whether `cmd` was dispatched to the node `ident` and is still its to answer."""
    return cmd.node is not None and cmd.node.identity == ident


def readable_id(frames: Sequence[bytes]) -> str | None:
    """The id of a message that failed validation, if it is a valid id itself."""
    if not frames:
        return None
    value = peek_header(frames[0], "id")
    return value if isinstance(value, str) and ID_MATCH(value) else None


def correlation(frames: Sequence[bytes]) -> str:
    """The command id inside a dispatch we built ourselves (so it decodes)."""
    try:
        return str(unpack_header(frames[1])["id"])
    except MeshError:
        return ""


def event_refused(
    counters: Counter[str], side: Side, ident: bytes, header: dict[str, Any], err: MeshError, now: float
) -> Outgoing:
    """A publisher's event refused, with the error's code (counted)."""
    counters["events_refused"] += 1
    return to_peer(side, ident, error_frames(err, now, header["id"]))
