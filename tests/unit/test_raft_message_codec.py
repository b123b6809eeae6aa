"""The cluster message codec: every message survives the wire; bad bytes raise errors from the mesh taxonomy."""

from __future__ import annotations

import msgpack
import pytest

from mesh.cluster import (
    MAX_RAFT_MESSAGE_BYTES,
    WIRE_VERSION,
    AppendRequest,
    AppendResponse,
    Entry,
    EntryKind,
    Message,
    Snapshot,
    SnapshotRequest,
    VoteRequest,
    VoteResponse,
    decode_message,
    encode_message,
)
from mesh.protocol import (
    BadFormatError,
    ErrorCode,
    MeshError,
    MessageTooLargeError,
    UnsupportedVersionError,
    ValidationFailedError,
)

SAMPLES: list[Message] = [
    VoteRequest("b", "a", 3, 10, 2, True),
    VoteResponse("a", "b", 3, False, False),
    AppendRequest("b", "a", 3, 4, 2, (Entry(5, 2, b"x"), Entry(6, 3, b"", EntryKind.NOOP)), 4),
    AppendRequest("c", "a", 1, 0, 0, (), 0),
    AppendResponse("a", "b", 3, False, 0, 4, 3, 2),
    SnapshotRequest("b", "a", 3, Snapshot(9, 2, b"\x00state")),
]


def _raw(*items: object) -> bytes:
    return msgpack.packb([WIRE_VERSION, *items], use_bin_type=True)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_survives_encode_and_decode(msg: Message) -> None:
    """decode_message(encode_message(m)) == m for each message type."""
    assert decode_message(encode_message(msg)) == msg


def test_the_wire_form_is_a_versioned_array_in_field_order() -> None:
    """The layout the transport and other implementations rely on (docs/cluster-core.md)."""
    assert msgpack.unpackb(encode_message(VoteResponse("a", "b", 3, True, False))) == [1, 2, "a", "b", 3, True, False]


BAD: list[tuple[str, bytes, type[MeshError], str | None]] = [
    ("not-msgpack", b"\xc1\xc1", BadFormatError, None),
    ("truncated", encode_message(SAMPLES[2])[:-3], BadFormatError, None),
    ("not-an-array", msgpack.packb({"to": "a"}), BadFormatError, None),
    ("empty-array", msgpack.packb([]), BadFormatError, None),
    ("other-version", msgpack.packb([2, 1, "b", "a", 1, 0, 0, True]), UnsupportedVersionError, None),
    ("unknown-tag", _raw(99, "b", "a", 1), BadFormatError, None),
    ("too-few-fields", _raw(1, "b", "a", 1, 0, 0), BadFormatError, None),
    ("term-not-int", _raw(1, "b", "a", "1", 0, 0, True), ValidationFailedError, "term"),
    ("term-zero", _raw(2, "a", "b", 0, True, False), ValidationFailedError, "term"),
    ("negative-index", _raw(1, "b", "a", 1, -1, 0, True), ValidationFailedError, "last_index"),
    ("bool-as-int", _raw(1, "b", "a", True, 0, 0, True), ValidationFailedError, "term"),
    ("empty-node-id", _raw(1, "", "a", 1, 0, 0, True), ValidationFailedError, "to"),
    ("long-node-id", _raw(1, "b" * 200, "a", 1, 0, 0, True), ValidationFailedError, "to"),
    ("flag-not-bool", _raw(2, "a", "b", 1, 1, False), ValidationFailedError, "granted"),
    ("entries-not-array", _raw(3, "b", "a", 1, 0, 0, "x", 0), ValidationFailedError, "entries"),
    ("entry-wrong-shape", _raw(3, "b", "a", 1, 0, 0, [[1, 1, 0]], 0), ValidationFailedError, "entries.0"),
    ("entry-data-str", _raw(3, "b", "a", 1, 0, 0, [[1, 1, 0, "x"]], 0), ValidationFailedError, "entries.0.data"),
    ("entry-kind-unknown", _raw(3, "b", "a", 1, 0, 0, [[1, 1, 7, b""]], 0), ValidationFailedError, "entries.0.kind"),
    ("entry-gap", _raw(3, "b", "a", 1, 0, 0, [[2, 1, 0, b""]], 0), ValidationFailedError, "entries.0.index"),
    ("entry-term-after-message", _raw(3, "b", "a", 1, 0, 0, [[1, 2, 0, b""]], 0), ValidationFailedError,
     "entries.0.term"),
    ("entry-term-backwards", _raw(3, "b", "a", 3, 0, 0, [[1, 2, 0, b""], [2, 1, 0, b""]], 0),
     ValidationFailedError, "entries.1.term"),
    ("snapshot-wrong-shape", _raw(5, "b", "a", 1, [1, 1]), ValidationFailedError, "snapshot"),
    ("snapshot-after-term", _raw(5, "b", "a", 1, [1, 2, b""]), ValidationFailedError, "snapshot.term"),
    ("snapshot-data-str", _raw(5, "b", "a", 1, [1, 1, "s"]), ValidationFailedError, "snapshot.data"),
]


@pytest.mark.parametrize("raw, error, field", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises_a_mesh_error_naming_the_problem(
    raw: bytes, error: type[MeshError], field: str | None
) -> None:
    """Each kind of bad input gives its taxonomy error; validation errors name the field."""
    with pytest.raises(error) as info:
        decode_message(raw)
    if field is not None:
        assert info.value.details["field"] == field
        assert repr(field) in info.value.message


def test_a_message_over_the_limit_is_refused_before_parsing() -> None:
    """Bytes over MAX_RAFT_MESSAGE_BYTES raise MessageTooLargeError with the limit."""
    with pytest.raises(MessageTooLargeError) as info:
        decode_message(b"\x00" * (MAX_RAFT_MESSAGE_BYTES + 1))
    assert info.value.details == {"limit": MAX_RAFT_MESSAGE_BYTES}
    assert info.value.code == ErrorCode.MESSAGE_TOO_LARGE
