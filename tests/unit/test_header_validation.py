"""Every validation rule of codec.decode_header, plus decode()'s frame count and check_size.

Each case builds a header map that is valid except for one thing and checks the error
class and `details["field"]` (see docs/protocol.md, section 3.3).
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest

from mesh.protocol import (
    MAX_HEADER_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_METADATA_ENTRIES,
    BadFormatError,
    ErrorCode,
    MeshError,
    MessageTooLargeError,
    MessageType,
    SecurityLevel,
    UnsupportedVersionError,
    ValidationFailedError,
    check_size,
    command,
    decode,
    decode_header,
    decode_payload,
    encode_header,
    encode_payload,
    unpack_header,
)

GOOD: dict[str, dict[str, Any]] = {
    "command": {"v": 1, "type": "command", "id": "c1", "ts": 1.0, "service": "echo", "action": "say"},
    "response": {"v": 1, "type": "response", "id": "r1", "ts": 1.0, "correlation_id": "c1"},
    "event": {"v": 1, "type": "event", "id": "e1", "ts": 1.0, "topic": "kv.changed"},
    "error": {
        "v": 1, "type": "error", "id": "x1", "ts": 1.0,
        "error": {"code": 1002, "message": "m", "retryable": False},
    },
}


class _Drop:
    """The marker for a key to remove; its repr is stable, so test ids match across xdist workers."""

    def __repr__(self) -> str:
        return "DROP"


DROP = _Drop()


def frame(kind: str = "command", **changes: Any) -> bytes:
    """A header frame of `kind` with `changes` applied (DROP removes a key)."""
    raw = dict(GOOD[kind])
    for key, value in changes.items():
        if value is DROP:
            raw.pop(key, None)
        else:
            raw[key] = value
    return msgpack.packb(raw, use_bin_type=True)


def error_frame(**changes: Any) -> bytes:
    """An error-message header frame whose `error` map has `changes` applied."""
    err = dict(GOOD["error"]["error"])
    for key, value in changes.items():
        if value is DROP:
            err.pop(key, None)
        else:
            err[key] = value
    return frame("error", error=err)


def security_frame(sec: Any) -> bytes:
    return frame("command", security=sec)


def refused(data: bytes, cls: type[MeshError], field: str | None) -> MeshError:
    """Decode `data` with decode_header and unpack_header (the broker's path), expect
    exactly `cls` from both, and check `details["field"]`."""
    errors = []
    for decoder in (decode_header, unpack_header):
        with pytest.raises(MeshError) as info:
            decoder(data)
        errors.append(info.value)
    err, fast = errors
    assert type(err) is cls, repr(err)
    assert type(fast) is cls and fast.details == err.details, (fast, err)
    if field is None:
        assert "field" not in err.details
    else:
        assert err.details.get("field") == field, (err.details, err.message)
    return err


def test_the_baseline_frames_are_valid() -> None:
    """Each GOOD map decodes, so every failure below comes from its one change."""
    for kind in GOOD:
        assert decode_header(frame(kind)).type is MessageType(kind)


def test_unpack_header_returns_the_wire_map() -> None:
    """unpack_header (the broker's hot path) returns the validated map with its wire keys."""
    for kind, raw in GOOD.items():
        assert unpack_header(frame(kind)) == raw


# ----------------------------------------------------------- frame level


@pytest.mark.parametrize(
    "value", [[1, 2], "command", None, 1, b"\x00", True, 1.5], ids=repr
)
def test_a_header_that_is_not_a_map_is_bad_format(value: Any) -> None:
    """A MessagePack value other than a map is BAD_FORMAT."""
    refused(msgpack.packb(value, use_bin_type=True), BadFormatError, None)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # the one byte MessagePack never uses
        b"\x85\xa1v",  # truncated
        frame() + b"\x00",  # trailing bytes
        b"\x81\xa1v\xa1\xff",  # invalid UTF-8 in a str
        msgpack.packb({1: 2}),  # a non-string map key
        msgpack.packb({"v": 1, "metadata": {3: "x"}}),  # a non-string map key, nested
    ],
    ids=["empty", "reserved-byte", "truncated", "trailing", "bad-utf8", "int-key", "nested-int-key"],
)
def test_a_header_that_is_not_messagepack_is_bad_format(data: bytes) -> None:
    """Bytes that are not exactly one MessagePack value (with string keys) are BAD_FORMAT."""
    refused(data, BadFormatError, None)


def test_a_header_over_max_header_bytes_is_too_large() -> None:
    """A header frame one byte over MAX_HEADER_BYTES is MESSAGE_TOO_LARGE, naming the limit."""
    err = refused(_header_of_size(MAX_HEADER_BYTES + 1), MessageTooLargeError, None)
    assert err.details["limit"] == MAX_HEADER_BYTES


def test_a_header_of_exactly_max_header_bytes_is_accepted() -> None:
    """A header frame of exactly MAX_HEADER_BYTES decodes."""
    assert decode_header(_header_of_size(MAX_HEADER_BYTES)).metadata["pad"]


def test_the_size_limit_is_checked_before_parsing() -> None:
    """An oversized frame of garbage is MESSAGE_TOO_LARGE, not BAD_FORMAT."""
    refused(b"\xc1" * (MAX_HEADER_BYTES + 1), MessageTooLargeError, None)


def _header_of_size(size: int) -> bytes:
    base = len(frame(metadata={"pad": "x" * 1000}))  # a str 16, like the final pad
    data = frame(metadata={"pad": "x" * (1000 + size - base)})
    assert len(data) == size
    return data


# ----------------------------------------------------------- version


@pytest.mark.parametrize(
    "version", [DROP, 2, 0, -1, "1", None, True, 1.0, 1.5, [1]], ids=repr
)
def test_a_missing_or_wrong_version_is_unsupported(version: Any) -> None:
    """`v` missing, not the integer 1 (True and 1.0 equal 1 in Python) is UNSUPPORTED_VERSION."""
    err = refused(frame(v=version), UnsupportedVersionError, "v")
    assert err.details["supported"] == [1]
    assert err.code == ErrorCode.UNSUPPORTED_VERSION


def test_the_version_is_checked_before_any_other_field() -> None:
    """A newer peer's header with unknown keys and types is refused for its version."""
    refused(frame(v=2, type="stream", shiny_new_key=1), UnsupportedVersionError, "v")


# ----------------------------------------------------------- keys and type


def test_an_unknown_key_is_refused_by_name() -> None:
    """A key outside the header's key set is VALIDATION_FAILED naming that key."""
    refused(frame(extra=1), ValidationFailedError, "extra")


def test_the_alphabetically_first_unknown_key_is_named() -> None:
    """With several unknown keys, the alphabetically first is reported."""
    refused(frame(zeta=1, alpha=2), ValidationFailedError, "alpha")


@pytest.mark.parametrize("mtype", [DROP, "cmd", "COMMAND", 1, None, True, b"command"], ids=repr)
def test_a_missing_or_unknown_type_is_refused(mtype: Any) -> None:
    """`type` missing or not one of the four type strings is VALIDATION_FAILED on `type`."""
    refused(frame(type=mtype), ValidationFailedError, "type")


@pytest.mark.parametrize("mtype", [["command"], {"a": 1}], ids=["array", "map"])
def test_unhashable_type_is_a_validation_error(mtype: Any) -> None:
    """An array or map as `type` is VALIDATION_FAILED on `type`, not a crash."""
    refused(frame(type=mtype), ValidationFailedError, "type")


# ----------------------------------------------------------- id and ts


@pytest.mark.parametrize(
    "mid", [DROP, "", "a b", "x" * 65, "caf\u00e9", "tab\t", "\x7f", 5, None, b"c1"], ids=repr
)
def test_a_missing_or_bad_id_is_refused(mid: Any) -> None:
    """`id` must be 1 to 64 printable ASCII characters without spaces."""
    refused(frame(id=mid), ValidationFailedError, "id")


@pytest.mark.parametrize("mid", ["x" * 64, "!", "~", "a-b_c.d:e/f"], ids=repr)
def test_ids_at_the_edges_of_the_pattern_are_accepted(mid: str) -> None:
    """Ids of 64 characters and of any printable ASCII are accepted."""
    assert decode_header(frame(id=mid)).id == mid


@pytest.mark.parametrize(
    "ts", [DROP, -1, -0.5, math.nan, math.inf, -math.inf, True, False, "1", None], ids=repr
)
def test_a_missing_or_bad_timestamp_is_refused(ts: Any) -> None:
    """`ts` must be a finite, non-negative number and not a boolean."""
    refused(frame(ts=ts), ValidationFailedError, "ts")


# ----------------------------------------------------------- names and routing fields


@pytest.mark.parametrize("key", ["service", "action"])
def test_a_command_without_service_or_action_is_refused(key: str) -> None:
    """A command needs both `service` and `action`."""
    refused(frame(**{key: DROP}), ValidationFailedError, key)


BAD_NAMES = ["", "-x", "_x", "a" * 65, "a.b", "a b", "caf\u00e9", 5, None, b"echo"]


@pytest.mark.parametrize("key", ["service", "action"])
@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_service_and_action_names_are_refused(key: str, name: Any) -> None:
    """Names are 1 to 64 of [A-Za-z0-9_-], starting with a letter or digit."""
    refused(frame(**{key: name}), ValidationFailedError, key)


@pytest.mark.parametrize("key", ["service", "action"])
def test_names_are_checked_on_other_types_when_present(key: str) -> None:
    """A response carrying a bad `service`/`action` is refused too."""
    refused(frame("response", **{key: "bad name"}), ValidationFailedError, key)


@pytest.mark.parametrize("name", ["a", "A" * 64, "0-_x", "echo"], ids=repr)
def test_good_names_are_accepted(name: str) -> None:
    """Names at the edges of the pattern decode."""
    header = decode_header(frame(service=name, action=name))
    assert header.service == header.action == name


def test_a_response_without_correlation_id_is_refused() -> None:
    """A response must say which command it answers."""
    refused(frame("response", correlation_id=DROP), ValidationFailedError, "correlation_id")


@pytest.mark.parametrize("kind", ["command", "response", "error"])
def test_a_bad_correlation_id_is_refused_on_any_type(kind: str) -> None:
    """A present `correlation_id` must match the id pattern."""
    refused(frame(kind, correlation_id="has space"), ValidationFailedError, "correlation_id")


def test_an_event_without_topic_is_refused() -> None:
    """An event must carry a topic."""
    refused(frame("event", topic=DROP), ValidationFailedError, "topic")


BAD_TOPICS = ["", ".a", "a.", "a..b", "a b", "a/b", ".".join(["s"] * 17), "x" * 65, "a." + "x" * 65, 5, None]


@pytest.mark.parametrize("topic", BAD_TOPICS, ids=lambda t: repr(t)[:20])
def test_bad_topics_are_refused(topic: Any) -> None:
    """Topics are 1 to 16 dot-separated segments of 1 to 64 of [A-Za-z0-9_-]."""
    refused(frame("event", topic=topic), ValidationFailedError, "topic")


def test_a_bad_topic_is_refused_on_a_command_too() -> None:
    """A present `topic` is checked whatever the type."""
    refused(frame("command", topic="a..b"), ValidationFailedError, "topic")


@pytest.mark.parametrize("topic", ["a", "-", ".".join(["s"] * 16), "x" * 64, "kv.changed.user-1"])
def test_topics_at_the_edges_of_the_pattern_are_accepted(topic: str) -> None:
    """Topics of 16 segments and segments of 64 characters decode."""
    assert decode_header(frame("event", topic=topic)).topic == topic


# ----------------------------------------------------------- deadline and metadata


@pytest.mark.parametrize(
    "deadline", [-1, -1e-9, math.nan, math.inf, -math.inf, True, "soon", None], ids=repr
)
def test_a_bad_deadline_is_refused(deadline: Any) -> None:
    """`deadline` must be a finite, non-negative number (and not nil)."""
    refused(frame(deadline=deadline), ValidationFailedError, "deadline")


def test_a_zero_or_integer_deadline_is_accepted() -> None:
    """A deadline of 0 or an integer is a valid number."""
    assert decode_header(frame(deadline=0)).deadline == 0.0
    assert decode_header(frame(deadline=1700000000)).deadline == 1700000000.0


@pytest.mark.parametrize("metadata", [[], "x", None, 1, b"\x80"], ids=repr)
def test_metadata_that_is_not_a_map_is_refused(metadata: Any) -> None:
    """`metadata` must be a map."""
    refused(frame(metadata=metadata), ValidationFailedError, "metadata")


def test_metadata_with_too_many_entries_is_refused() -> None:
    """More than MAX_METADATA_ENTRIES entries is VALIDATION_FAILED on `metadata`."""
    too_many = {f"k{i}": i for i in range(MAX_METADATA_ENTRIES + 1)}
    refused(frame(metadata=too_many), ValidationFailedError, "metadata")


def test_metadata_of_exactly_the_limit_is_accepted() -> None:
    """Exactly MAX_METADATA_ENTRIES entries decode."""
    full = {f"k{i}": i for i in range(MAX_METADATA_ENTRIES)}
    assert dict(decode_header(frame(metadata=full)).metadata) == full


def test_metadata_with_binary_keys_is_refused() -> None:
    """Metadata keys must be strings (a bin key is VALIDATION_FAILED on `metadata`)."""
    refused(frame(metadata={b"k": 1}), ValidationFailedError, "metadata")


# ----------------------------------------------------------- security


@pytest.mark.parametrize("sec", ["x", None, [], 3], ids=repr)
def test_security_that_is_not_a_map_is_refused(sec: Any) -> None:
    """`security` must be a map."""
    refused(security_frame(sec), ValidationFailedError, "security")


def test_security_with_an_unknown_key_is_refused_by_name() -> None:
    """An unknown key inside `security` is named as security.<key>."""
    refused(security_frame({"level": 1, "cipher": "rot13"}), ValidationFailedError, "security.cipher")


@pytest.mark.parametrize("level", [4, -1, True, "1", 1.0, None], ids=repr)
def test_a_bad_security_level_is_refused(level: Any) -> None:
    """`security.level` must be the integer 0, 1, 2 or 3."""
    refused(security_frame({"level": level}), ValidationFailedError, "security.level")


@pytest.mark.parametrize("sig", ["abc", 5, [1]], ids=repr)
def test_a_non_binary_signature_is_refused(sig: Any) -> None:
    """`security.signature` must be MessagePack bin."""
    refused(security_frame({"level": 3, "signature": sig}), ValidationFailedError, "security.signature")


@pytest.mark.parametrize("token", [b"eyJ", 5, {"jwt": "x"}], ids=repr)
def test_a_non_string_token_is_refused(token: Any) -> None:
    """`security.token` must be a string."""
    refused(security_frame({"level": 1, "token": token}), ValidationFailedError, "security.token")


@pytest.mark.parametrize("enc", ["AES", 5, [1], {b"k": 1}], ids=repr)
def test_bad_encryption_info_is_refused(enc: Any) -> None:
    """`security.encryption` must be a map with string keys."""
    refused(security_frame({"level": 2, "encryption": enc}), ValidationFailedError, "security.encryption")


def test_security_defaults_to_level_none() -> None:
    """An empty security map decodes to level NONE with nothing else set."""
    sec = decode_header(security_frame({})).security
    assert sec is not None and sec.security_level is SecurityLevel.NONE
    assert (sec.encryption_info, sec.signature, sec.auth_token) == (None, None, None)


def test_nil_security_subkeys_read_as_absent() -> None:
    """`encryption`, `signature` and `token` set to nil are read as absent."""
    sec = decode_header(security_frame({"level": 1, "encryption": None, "signature": None, "token": None})).security
    assert sec is not None and (sec.encryption_info, sec.signature, sec.auth_token) == (None, None, None)


# ----------------------------------------------------------- error map


def test_an_error_message_without_error_map_is_refused() -> None:
    """A message of type error must carry the `error` map."""
    refused(frame("error", error=DROP), ValidationFailedError, "error")


@pytest.mark.parametrize("err", ["boom", None, [], 1003], ids=repr)
def test_an_error_that_is_not_a_map_is_refused(err: Any) -> None:
    """`error` must be a map."""
    refused(frame("error", error=err), ValidationFailedError, "error")


def test_an_unknown_key_in_the_error_map_is_refused_by_name() -> None:
    """An unknown key inside `error` is named as error.<key>."""
    refused(error_frame(stack="..."), ValidationFailedError, "error.stack")


@pytest.mark.parametrize("code", [DROP, 0, -1, 10000, True, "1002", 1002.0, None], ids=repr)
def test_a_missing_or_bad_error_code_is_refused(code: Any) -> None:
    """`error.code` must be an integer from 1 to 9999 (not a boolean)."""
    refused(error_frame(code=code), ValidationFailedError, "error.code")


@pytest.mark.parametrize("message", [DROP, 5, None, b"m"], ids=repr)
def test_a_missing_or_bad_error_message_is_refused(message: Any) -> None:
    """`error.message` must be a string."""
    refused(error_frame(message=message), ValidationFailedError, "error.message")


@pytest.mark.parametrize("retryable", [DROP, 0, 1, "no", None], ids=repr)
def test_a_missing_or_bad_retryable_flag_is_refused(retryable: Any) -> None:
    """`error.retryable` must be a boolean."""
    refused(error_frame(retryable=retryable), ValidationFailedError, "error.retryable")


@pytest.mark.parametrize("details", ["x", None, [], {b"k": 1}], ids=repr)
def test_bad_error_details_are_refused(details: Any) -> None:
    """`error.details` must be a map with string keys."""
    refused(error_frame(details=details), ValidationFailedError, "error.details")


@pytest.mark.parametrize("code", [1, 9999, 4242])
def test_any_code_in_range_is_accepted_even_unknown(code: int) -> None:
    """Codes from 1 to 9999 decode, including codes this version does not know."""
    header = decode_header(error_frame(code=code))
    assert header.error is not None and header.error.code == code
    assert header.error.details == {}


@pytest.mark.parametrize("kind", ["command", "response", "event"])
def test_an_error_map_on_a_non_error_message_is_refused(kind: str) -> None:
    """Only messages of type error may carry `error`."""
    refused(frame(kind, error=GOOD["error"]["error"]), ValidationFailedError, "error")


# ----------------------------------------------------------- order of the checks


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"extra": 1, "type": "nope"}, "extra"),
        ({"type": "nope", "id": ""}, "type"),
        ({"id": "", "ts": -1}, "id"),
        ({"ts": -1, "service": DROP}, "ts"),
        ({"service": DROP, "action": DROP}, "service"),
        ({"action": DROP, "topic": ""}, "action"),
        ({"topic": "", "correlation_id": ""}, "topic"),
        ({"correlation_id": "", "deadline": -1}, "correlation_id"),
        ({"deadline": -1, "metadata": []}, "deadline"),
        ({"metadata": [], "security": []}, "metadata"),
        ({"security": [], "error": {}}, "security"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_the_first_failing_rule_in_documented_order_is_reported(changes: dict[str, Any], field: str) -> None:
    """With two problems, the one earlier in docs/protocol.md section 3.3 is reported."""
    refused(frame(**changes), ValidationFailedError, field)


def test_validation_errors_are_protocol_errors_with_code_1002() -> None:
    """A refused field raises code VALIDATION_FAILED, a non-retryable protocol error."""
    err = refused(frame(id=""), ValidationFailedError, "id")
    assert err.code == 1002 and not err.retryable and err.category == "protocol"


# ----------------------------------------------------------- decode() and check_size


@pytest.mark.parametrize("count", [0, 1, 3, 4])
def test_decode_needs_exactly_two_frames(count: int) -> None:
    """decode() refuses any frame count but 2 as BAD_FORMAT, reporting the count."""
    frames = [frame(), encode_payload(None), b"", b""][:count]
    with pytest.raises(BadFormatError) as info:
        decode(frames)
    assert info.value.details == {"frames": count}


def test_decode_refuses_a_bad_payload_frame() -> None:
    """A valid header with a payload that is not MessagePack is BAD_FORMAT."""
    with pytest.raises(BadFormatError):
        decode([frame(), b"\xc1"])


def test_decode_refuses_an_empty_payload_frame() -> None:
    """An empty payload frame is BAD_FORMAT (nil is the byte c0)."""
    with pytest.raises(BadFormatError):
        decode([frame(), b""])


def test_decode_checks_the_total_size_before_the_header() -> None:
    """An oversized message with a broken header is MESSAGE_TOO_LARGE, naming the limit."""
    with pytest.raises(MessageTooLargeError) as info:
        decode([b"\xc1", b"\xc0" * 100], limit=50)
    assert info.value.details == {"limit": 50}


def test_check_size_counts_every_frame() -> None:
    """check_size sums all frames: at the limit passes, one byte over is MESSAGE_TOO_LARGE."""
    check_size([b"a" * 10, b"b" * 10], limit=20)
    with pytest.raises(MessageTooLargeError) as info:
        check_size([b"a" * 10, b"b" * 11], limit=20)
    assert info.value.details == {"limit": 20}


def test_check_size_defaults_to_max_message_bytes() -> None:
    """Without a limit, check_size allows exactly MAX_MESSAGE_BYTES."""
    check_size([b"\x00" * MAX_MESSAGE_BYTES])
    with pytest.raises(MessageTooLargeError):
        check_size([b"\x00" * MAX_MESSAGE_BYTES, b"\x00"])


# ----------------------------------------------------------- the encoders


@pytest.mark.parametrize("value", [{1, 2}, object(), 2**64, -(2**63) - 1], ids=["set", "object", "2**64", "-2**63-1"])
def test_encode_payload_refuses_what_messagepack_cannot_carry(value: Any) -> None:
    """A payload MessagePack cannot encode is VALIDATION_FAILED on `payload`."""
    with pytest.raises(ValidationFailedError) as info:
        encode_payload(value)
    assert info.value.details["field"] == "payload"


@pytest.mark.parametrize(
    "value",
    [{1: "one"}, {-3: {4: None}}, {2.5: [1]}, {b"k": 1}, {True: "yes"}, {None: 0}, {"s": {7: "mixed"}}],
    ids=repr,
)
def test_a_payload_with_non_string_map_keys_decodes(value: Any) -> None:
    """A payload whose maps have scalar keys other than strings decodes to the same value."""
    assert decode_payload(encode_payload(value)) == value


def test_a_header_with_non_string_map_keys_is_still_refused() -> None:
    """Only payloads allow non-string map keys: a header holding a map keyed by an integer is BAD_FORMAT."""
    refused(msgpack.packb({**GOOD["command"], 1: "x"}), BadFormatError, None)
    refused(frame(metadata={1: "x"}), BadFormatError, None)


def test_a_payload_with_a_composite_map_key_is_refused_by_the_receiver() -> None:
    """Map keys must be scalars: a tuple key encodes (as an array) but the receiver refuses it as BAD_FORMAT."""
    data = encode_payload({(1, 2): "pair"})
    with pytest.raises(BadFormatError):
        decode_payload(data)


@pytest.mark.parametrize("bad", [{1, 2}, 2**64], ids=["set", "2**64"])
def test_encode_header_refuses_unencodable_metadata_with_a_mesh_error(bad: Any) -> None:
    """Metadata MessagePack cannot encode is a ValidationFailedError on `metadata`, not a msgpack exception."""
    header = command("echo", "say", now=1.0, id="c1", metadata={"bad": bad})
    with pytest.raises(ValidationFailedError) as info:
        encode_header(header)
    assert info.value.details == {"field": "metadata"}
    assert info.value.message.startswith("metadata: cannot be encoded as MessagePack")


# ----------------------------------------------------------- command()


@pytest.mark.parametrize(
    ("service", "action", "field"),
    [
        ("", "say", "service"),
        ("echo service", "say", "service"),
        ("-echo", "say", "service"),
        ("x" * 65, "say", "service"),
        ("echo", "", "action"),
        ("echo", "say.loud", "action"),
        ("echo", "caf\u00e9", "action"),
    ],
    ids=repr,
)
def test_command_refuses_bad_service_and_action_names(service: str, action: str, field: str) -> None:
    """command() validates names as the decoder does: VALIDATION_FAILED naming `service` or `action`."""
    with pytest.raises(ValidationFailedError) as info:
        command(service, action, now=1.0)
    assert info.value.details == {"field": field}


@pytest.mark.parametrize(("service", "action"), [("echo", "say"), ("x" * 64, "a_b-C9"), ("9", "Z")], ids=repr)
def test_command_accepts_names_the_decoder_accepts(service: str, action: str) -> None:
    """Names at the edges of NAME_PATTERN make a command that encodes and decodes."""
    header = command(service, action, now=1.0, id="c1")
    decoded = decode_header(encode_header(header))
    assert (decoded.service, decoded.action) == (service, action)



@pytest.mark.parametrize("seq", [0, -1, True, 1.0, "1", None], ids=repr)
def test_a_bad_seq_is_refused(seq: Any) -> None:
    """An event's `seq` is an integer from 1 (not a boolean, a float or a string)."""
    refused(frame("event", seq=seq), ValidationFailedError, "seq")


@pytest.mark.parametrize("mtype", ["command", "response", "error"])
def test_seq_only_on_events(mtype: str) -> None:
    """Only events are numbered."""
    refused(frame(mtype, seq=1), ValidationFailedError, "seq")


def test_an_event_with_seq_is_accepted() -> None:
    """The broker's stamped events decode with their number."""
    assert decode_header(frame("event", seq=2**40)).seq == 2**40


@pytest.mark.parametrize(
    ("mtype", "sender"),
    [("command", "alice"), ("response", "alice"), ("event", ""), ("event", "a b"), ("event", 7)],
    ids=["command", "response", "empty", "space", "int"],
)
def test_sender_only_on_events_and_a_name(mtype: str, sender: Any) -> None:
    """Only the broker's stamped events name their publisher, and with a name: a client cannot
    pass a `sender` to a node inside a command header."""
    refused(frame(mtype, sender=sender), ValidationFailedError, "sender")


def test_an_event_with_a_sender_is_accepted() -> None:
    """A stamped event's publisher name passes validation."""
    assert unpack_header(frame("event", sender="alice"))["sender"] == "alice"
