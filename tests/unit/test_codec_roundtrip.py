"""Property tests of the codec: valid records round-trip, bad bytes only ever raise MeshError."""

from __future__ import annotations

import copy
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mesh.protocol import (
    ID_PATTERN,
    MAX_HEADER_BYTES,
    MAX_METADATA_ENTRIES,
    NAME_PATTERN,
    TOPIC_PATTERN,
    BadFormatError,
    ErrorInfo,
    Header,
    MeshError,
    Message,
    MessageType,
    SecurityInfo,
    SecurityLevel,
    decode,
    decode_header,
    decode_payload,
    encode,
    encode_header,
    encode_payload,
)

# ------------------------------------------------------------------ strategies

ids = st.from_regex(ID_PATTERN, fullmatch=True)
names = st.from_regex(NAME_PATTERN, fullmatch=True)
topics = st.from_regex(TOPIC_PATTERN, fullmatch=True)
times = st.floats(min_value=0.0, max_value=4e9, allow_nan=False, allow_infinity=False)

# Values that survive a MessagePack round trip unchanged: lists (not tuples), no NaN
# (NaN != NaN), integers in MessagePack's range. `values` has str keys only, as headers
# require; `payload_values` below keys its maps by any scalar.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
# Payload maps may also be keyed by any scalar (headers keep string keys).
payload_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(scalars, inner, max_size=4),
    max_leaves=10,
)
string_maps = st.dictionaries(st.text(max_size=12), values, max_size=6)
metadata = st.dictionaries(st.text(max_size=12), values, max_size=MAX_METADATA_ENTRIES)

security_infos = st.builds(
    SecurityInfo,
    security_level=st.sampled_from(SecurityLevel),
    encryption_info=st.none() | string_maps,
    signature=st.none() | st.binary(max_size=96),
    auth_token=st.none() | st.text(max_size=200),
)
error_infos = st.builds(
    ErrorInfo,
    code=st.integers(min_value=1, max_value=9999),
    message=st.text(max_size=100),
    retryable=st.booleans(),
    details=string_maps,
)


@st.composite
def headers(draw: st.DrawFn, types: st.SearchStrategy[MessageType] = st.sampled_from(MessageType)) -> Header:
    """Any valid Header: the fields its type requires, and any of the optional ones."""
    mtype = draw(types)

    def required_if(cond: bool, strategy: st.SearchStrategy[Any]) -> Any:
        return draw(strategy) if cond else draw(st.none() | strategy)

    return Header(
        type=mtype,
        id=draw(ids),
        timestamp=draw(times),
        service=required_if(mtype is MessageType.COMMAND, names),
        action=required_if(mtype is MessageType.COMMAND, names),
        topic=required_if(mtype is MessageType.EVENT, topics),
        seq=draw(st.none() | st.integers(1, 2**63)) if mtype is MessageType.EVENT else None,
        correlation_id=required_if(mtype in (MessageType.RESPONSE, MessageType.CANCEL, MessageType.PROGRESS), ids),
        deadline=draw(st.none() | times),
        metadata=draw(metadata),
        security=draw(st.none() | security_infos),
        error=draw(error_infos) if mtype is MessageType.ERROR else None,
    )


def _fits(frame: bytes) -> bytes:
    assume(len(frame) <= MAX_HEADER_BYTES)
    return frame


ROUNDTRIP = settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("mtype", list(MessageType), ids=lambda t: t.value)
@ROUNDTRIP
@given(data=st.data())
def test_every_valid_header_of_each_type_round_trips(mtype: MessageType, data: st.DataObject) -> None:
    """A valid header of each type decodes to an equal Header after encoding."""
    header = data.draw(headers(st.just(mtype)))
    assert decode_header(_fits(encode_header(header))) == header


@ROUNDTRIP
@given(headers())
def test_header_encoding_is_deterministic_and_canonical(header: Header) -> None:
    """The same header always gives the same bytes, and re-encoding decoded bytes changes nothing."""
    frame = _fits(encode_header(header))
    assert encode_header(header) == frame
    assert encode_header(copy.deepcopy(header)) == frame
    assert encode_header(decode_header(frame)) == frame


@settings(max_examples=200)
@given(payload_values)
def test_any_msgpack_value_round_trips_as_a_payload(value: Any) -> None:
    """decode_payload(encode_payload(v)) == v for any MessagePack value, maps keyed by any scalar."""
    assert decode_payload(encode_payload(value)) == value


@settings(max_examples=200)
@given(payload_values)
def test_payload_encoding_is_deterministic(value: Any) -> None:
    """Encoding the same payload twice gives the same bytes."""
    assert encode_payload(value) == encode_payload(copy.deepcopy(value))


@ROUNDTRIP
@given(headers(), payload_values)
def test_whole_message_round_trips_through_encode_and_decode(header: Header, payload: Any) -> None:
    """decode(encode(message)) gives back the same header and payload."""
    _fits(encode_header(header))
    msg = Message(header, payload)
    assert decode(encode(msg)) == msg


def test_integer_timestamps_decode_as_floats() -> None:
    """A `ts` written as an integer is accepted and read as a float."""
    frame = msgpack.packb({"v": 1, "type": "event", "id": "e", "ts": 5, "topic": "t"})
    header = decode_header(frame)
    assert header.timestamp == 5.0 and isinstance(header.timestamp, float)


def test_equal_headers_encode_to_equal_bytes() -> None:
    """Two equal headers (metadata keys inserted in another order) encode identically."""
    a = Header(type=MessageType.EVENT, id="e", timestamp=1.0, topic="t", metadata={"a": 1, "b": 2})
    b = Header(type=MessageType.EVENT, id="e", timestamp=1.0, topic="t", metadata={"b": 2, "a": 1})
    assert a == b
    assert encode_header(a) == encode_header(b)


# ------------------------------------------------------------------ bad bytes

FUZZ = settings(max_examples=500)


@FUZZ
@given(st.binary(max_size=256))
def test_random_bytes_as_a_header_raise_only_mesh_errors(frame: bytes) -> None:
    """decode_header on arbitrary bytes returns a Header or raises a MeshError, nothing else."""
    try:
        decode_header(frame)
    except MeshError:
        pass


@FUZZ
@given(st.binary(max_size=256))
def test_random_bytes_as_a_payload_raise_only_mesh_errors(frame: bytes) -> None:
    """decode_payload on arbitrary bytes returns a value or raises a MeshError, nothing else."""
    try:
        decode_payload(frame)
    except MeshError:
        pass


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=4))
def test_random_frame_lists_raise_only_mesh_errors(frames: list[bytes]) -> None:
    """decode on any list of frames returns a Message or raises a MeshError, nothing else."""
    try:
        decode(frames)
    except MeshError:
        pass


@ROUNDTRIP
@given(headers(), st.data())
def test_truncated_header_frames_are_bad_format(header: Header, data: st.DataObject) -> None:
    """Every strict prefix of a valid header frame is refused as BAD_FORMAT."""
    frame = _fits(encode_header(header))
    cut = data.draw(st.integers(min_value=0, max_value=len(frame) - 1))
    with pytest.raises(BadFormatError):
        decode_header(frame[:cut])


@settings(max_examples=200)
@given(values, st.data())
def test_truncated_payload_frames_are_bad_format(value: Any, data: st.DataObject) -> None:
    """Every strict prefix of a valid payload frame is refused as BAD_FORMAT."""
    frame = encode_payload(value)
    cut = data.draw(st.integers(min_value=0, max_value=len(frame) - 1))
    with pytest.raises(BadFormatError):
        decode_payload(frame[:cut])


@ROUNDTRIP
@given(headers(), st.binary(min_size=1, max_size=8))
def test_trailing_bytes_after_a_header_are_bad_format(header: Header, extra: bytes) -> None:
    """A valid header frame followed by any extra bytes is refused as BAD_FORMAT."""
    frame = encode_header(header) + extra
    assume(len(frame) <= MAX_HEADER_BYTES)
    with pytest.raises(BadFormatError):
        decode_header(frame)


@ROUNDTRIP
@given(headers(), st.data())
def test_corrupted_header_frames_raise_only_mesh_errors(header: Header, data: st.DataObject) -> None:
    """Overwriting bytes of a valid header frame yields a Header or a MeshError, nothing else."""
    frame = bytearray(_fits(encode_header(header)))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        i = data.draw(st.integers(min_value=0, max_value=len(frame) - 1))
        frame[i] = data.draw(st.integers(0, 255))
    assume(not _hits_unhashable_type_bug(bytes(frame)))
    try:
        decode_header(bytes(frame))
    except MeshError:
        pass


def _hits_unhashable_type_bug(frame: bytes) -> bool:
    """True for a map whose `type` is an array or map: the reported bug, tested on its own
    in test_header_validation.py::test_unhashable_type_is_a_validation_error."""
    try:
        raw = msgpack.unpackb(frame, raw=False)
    except Exception:  # noqa: BLE001 - msgpack raises several unrelated types for bad input
        return False
    return isinstance(raw, dict) and isinstance(raw.get("type"), (list, dict))


HEADER_KEYS = ["v", "type", "id", "ts", "service", "action", "topic", "correlation_id",
               "deadline", "metadata", "security", "error", "extra"]
hashable_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8) | st.binary(max_size=8)


@settings(max_examples=400)
@given(
    st.dictionaries(st.sampled_from(HEADER_KEYS), values, max_size=8),
    st.sampled_from(["command", "response", "event", "error"]) | hashable_scalars,
    st.booleans(),
)
def test_maps_with_header_keys_and_any_values_raise_only_mesh_errors(
    fields: dict[str, Any], mtype: Any, versioned: bool
) -> None:
    """A map of header keys to arbitrary values decodes or raises a MeshError, nothing else."""
    raw = dict(fields)
    # `type` is drawn from hashable values only: lists and maps there hit the reported
    # bug covered by test_header_validation.py::test_unhashable_type_is_a_validation_error.
    raw["type"] = mtype
    if versioned:
        raw["v"] = 1
    frame = msgpack.packb(raw, use_bin_type=True)
    assume(len(frame) <= MAX_HEADER_BYTES)
    try:
        decode_header(frame)
    except MeshError:
        pass
