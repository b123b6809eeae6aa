"""The records of the consensus core and their wire codec.

Rules of this module:

* One frozen dataclass per Raft message, each with `to`, `frm` and `term`. The core
  builds them itself, so constructors do not re-validate (the simulator makes millions);
  everything that arrives from another process goes through `decode_message`, which
  checks every field before building the record.
* The wire form is one MessagePack array: `[WIRE_VERSION, tag, to, frm, term, ...]`,
  the remaining fields in declaration order; entries are `[index, term, kind, data]`,
  snapshots `[index, term, data]`. Arrays, not maps: the field order is the schema.
* Bad input raises from the mesh taxonomy: `MessageTooLargeError` over
  the limit (`MAX_RAFT_MESSAGE_BYTES` unless told), `BadFormatError` when it is not such an array,
  `UnsupportedVersionError` for another wire version, `ValidationFailedError` (with
  `details["field"]`) for a field of the wrong type or value.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Any, Final, TypeAlias

import msgpack

from ..protocol.errors import (
    BadFormatError,
    MessageTooLargeError,
    UnsupportedVersionError,
    ValidationFailedError,
)

__all__ = [
    "WIRE_VERSION",
    "MAX_RAFT_MESSAGE_BYTES",
    "MAX_PROPOSAL_BYTES",
    "MAX_CHUNKED_MESSAGE_BYTES",
    "MAX_NODE_ID_CHARS",
    "EntryKind",
    "Entry",
    "Snapshot",
    "HardState",
    "VoteRequest",
    "VoteResponse",
    "AppendRequest",
    "AppendResponse",
    "SnapshotRequest",
    "Message",
    "encode_message",
    "decode_message",
]

WIRE_VERSION: Final = 1
# The most a consensus message decodes from one frame; the peer links send anything
# over 4 MiB (a big snapshot) in chunks and join it again, up to MAX_CHUNKED_MESSAGE_BYTES.
MAX_RAFT_MESSAGE_BYTES: Final = 64 * 1024 * 1024
MAX_CHUNKED_MESSAGE_BYTES: Final = 1024 * 1024 * 1024
MAX_PROPOSAL_BYTES: Final = 4 * 1024 * 1024  # one log entry's data
MAX_NODE_ID_CHARS: Final = 128


class EntryKind(IntEnum):
    """What a log entry carries."""

    NORMAL = 0  # data proposed by the application
    NOOP = 1  # appended by each new leader so it can commit entries of earlier terms


@dataclass(frozen=True, slots=True)
class Entry:
    """One log entry; `data` is opaque to the core."""

    index: int
    term: int
    data: bytes = b""
    kind: EntryKind = EntryKind.NORMAL


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The application's state after applying every entry up to `index` (of `term`)."""

    index: int = 0
    term: int = 0
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class HardState:
    """What a node must persist before it sends anything that depends on it."""

    term: int = 0
    vote: str | None = None
    commit: int = 0


@dataclass(frozen=True, slots=True)
class VoteRequest:
    """RequestVote; with `pre_vote` it asks "would you vote?" without changing terms."""

    to: str
    frm: str
    term: int
    last_index: int
    last_term: int
    pre_vote: bool


@dataclass(frozen=True, slots=True)
class VoteResponse:
    """The answer to a VoteRequest; `pre_vote` echoes the request's."""

    to: str
    frm: str
    term: int
    granted: bool
    pre_vote: bool


@dataclass(frozen=True, slots=True)
class AppendRequest:
    """AppendEntries; with no entries it is the leader's heartbeat."""

    to: str
    frm: str
    term: int
    prev_index: int
    prev_term: int
    entries: tuple[Entry, ...]
    commit: int


@dataclass(frozen=True, slots=True)
class AppendResponse:
    """The answer to AppendRequest and SnapshotRequest.

    On success `match_index` is the last index known to match the leader's log. On
    failure `reject_index` is the request's `prev_index` (so the leader can ignore stale
    rejections) and the hint lets the leader skip a whole term at once: `conflict_term`
    is the follower's term at `reject_index` (0 when its log is shorter) and
    `conflict_index` the first index it holds of that term (or its last index + 1).
    """

    to: str
    frm: str
    term: int
    success: bool
    match_index: int
    reject_index: int
    conflict_index: int
    conflict_term: int


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    """InstallSnapshot in one piece, for a follower behind the leader's compacted log."""

    to: str
    frm: str
    term: int
    snapshot: Snapshot


Message: TypeAlias = VoteRequest | VoteResponse | AppendRequest | AppendResponse | SnapshotRequest

_TAGS: Final[dict[type, int]] = {
    VoteRequest: 1,
    VoteResponse: 2,
    AppendRequest: 3,
    AppendResponse: 4,
    SnapshotRequest: 5,
}
_CLASSES: Final[dict[int, type[Message]]] = {tag: cls for cls, tag in _TAGS.items()}
_FIELDS: Final = {cls: tuple(f.name for f in fields(cls)) for cls in _TAGS}


def encode_message(msg: Message) -> bytes:
    """The wire bytes of one message (see the module rules for the layout)."""
    out: list[Any] = [WIRE_VERSION, _TAGS[type(msg)]]
    for name in _FIELDS[type(msg)]:
        value = getattr(msg, name)
        if name == "entries":
            value = [[e.index, e.term, int(e.kind), e.data] for e in value]
        elif name == "snapshot":
            value = [value.index, value.term, value.data]
        out.append(value)
    return msgpack.packb(out, use_bin_type=True)


def decode_message(raw: bytes, limit: int = MAX_RAFT_MESSAGE_BYTES) -> Message:
    """Parse and validate one message from a peer (`limit`: its most bytes).

    Raises:
        MessageTooLargeError: over `limit`.
        BadFormatError: not one MessagePack array of a known message tag.
        UnsupportedVersionError: another wire version.
        ValidationFailedError: a field of the wrong type or value; `details["field"]`.
    """
    if len(raw) > limit:
        raise MessageTooLargeError(f"cluster message of {len(raw)} bytes is over the limit", details={"limit": limit})
    try:
        items = msgpack.unpackb(raw, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types for bad bytes
        raise BadFormatError(f"cluster message is not MessagePack ({type(exc).__name__})") from None
    if not isinstance(items, list) or len(items) < 2:
        raise BadFormatError("cluster message is not an array of [version, tag, ...]")
    version, tag = items[0], items[1]
    if version != WIRE_VERSION or type(version) is not int:
        raise UnsupportedVersionError(
            f"cluster message version {version!r} is not supported", details={"supported": [WIRE_VERSION]}
        )
    cls = _CLASSES.get(tag) if type(tag) is int else None
    if cls is None:
        raise BadFormatError(f"unknown cluster message tag {tag!r}")
    names = _FIELDS[cls]
    if len(items) != 2 + len(names):
        raise BadFormatError(
            f"{cls.__name__} has {len(names)} fields, got {len(items) - 2}",
            details={"message": cls.__name__},
        )
    values: dict[str, Any] = {
        name: _FIELD_CHECKS[name](name, value) for name, value in zip(names, items[2:], strict=True)
    }
    msg: Message = cls(**values)
    _check_consistency(msg)
    return msg


def _invalid(field: str, what: str) -> ValidationFailedError:
    return ValidationFailedError(f"cluster message field {field!r} {what}", details={"field": field})


def _uint(field: str, value: Any) -> int:
    if type(value) is not int or value < 0:
        raise _invalid(field, "must be a non-negative integer")
    return value


def _node_id(field: str, value: Any) -> str:
    if type(value) is not str or not 0 < len(value) <= MAX_NODE_ID_CHARS:
        raise _invalid(field, f"must be a node id of 1-{MAX_NODE_ID_CHARS} characters")
    return value


def _flag(field: str, value: Any) -> bool:
    if type(value) is not bool:
        raise _invalid(field, "must be true or false")
    return value


def _entries(field: str, value: Any) -> tuple[Entry, ...]:
    if not isinstance(value, list):
        raise _invalid(field, "must be an array of entries")
    out = []
    for i, item in enumerate(value):
        where = f"{field}.{i}"
        if not isinstance(item, list) or len(item) != 4:
            raise _invalid(where, "must be [index, term, kind, data]")
        index, term, kind, data = item
        if type(kind) is not int or kind not in EntryKind._value2member_map_:
            raise _invalid(f"{where}.kind", "is not a known entry kind")
        if type(data) is not bytes:
            raise _invalid(f"{where}.data", "must be bytes")
        out.append(Entry(_uint(f"{where}.index", index), _uint(f"{where}.term", term), data, EntryKind(kind)))
    return tuple(out)


def _snapshot(field: str, value: Any) -> Snapshot:
    if not isinstance(value, list) or len(value) != 3:
        raise _invalid(field, "must be [index, term, data]")
    index, term, data = value
    if type(data) is not bytes:
        raise _invalid(f"{field}.data", "must be bytes")
    return Snapshot(_uint(f"{field}.index", index), _uint(f"{field}.term", term), data)


_FIELD_CHECKS: Final = {
    "to": _node_id,
    "frm": _node_id,
    "term": _uint,
    "last_index": _uint,
    "last_term": _uint,
    "pre_vote": _flag,
    "granted": _flag,
    "prev_index": _uint,
    "prev_term": _uint,
    "entries": _entries,
    "commit": _uint,
    "success": _flag,
    "match_index": _uint,
    "reject_index": _uint,
    "conflict_index": _uint,
    "conflict_term": _uint,
    "snapshot": _snapshot,
}


def _check_consistency(msg: Message) -> None:
    """Facts between fields that the core relies on and a correct peer never breaks."""
    if msg.term == 0:
        raise _invalid("term", "must be at least 1")
    if isinstance(msg, AppendRequest):
        for offset, entry in enumerate(msg.entries, start=1):
            if entry.index != msg.prev_index + offset:
                raise _invalid(f"entries.{offset - 1}.index", "must follow prev_index without gaps")
            if not msg.prev_term <= entry.term <= msg.term:
                raise _invalid(f"entries.{offset - 1}.term", "must lie between prev_term and the message term")
            if offset > 1 and entry.term < msg.entries[offset - 2].term:
                raise _invalid(f"entries.{offset - 1}.term", "must not go backwards")
    elif isinstance(msg, SnapshotRequest) and msg.snapshot.term > msg.term:
        raise _invalid("snapshot.term", "must not be after the message term")
