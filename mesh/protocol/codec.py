"""The one codec: MessagePack frames to validated records and back.

Rules of this module:

* A message is two ZeroMQ frames, header then payload (see docs/protocol.md). Brokers
  call `decode_header` only; the payload frame travels untouched.
* Decoding is strict: a wrong type, an unknown key, a bad name or id, a version we do not
  speak each raise a `MeshError` whose details name the offending field. Nothing here
  raises anything else, so callers need one `except MeshError`.
* Decoding is bounded: every MessagePack value from a peer is read with a cap on its
  containers (maps and arrays) and on their nesting (`MAX_DEPTH`), enforced while
  msgpack builds them, so a small frame of millions of empty maps costs microseconds to
  refuse, not a stall. Errors quote at most `MAX_QUOTE` characters of what was sent.
* Encoding writes keys in one fixed order and omits empty optional keys, so the same
  record always gives the same bytes (the test vectors in the docs rely on it).
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Mapping, Sequence
from typing import Any, Final

import msgpack

from .errors import (
    BadFormatError,
    MessageTooLargeError,
    UnsupportedVersionError,
)
from .message import (
    PROTOCOL_VERSION,
    ErrorInfo,
    Header,
    Message,
    MessageType,
    SecurityInfo,
    SecurityLevel,
    new_id,
)
from .names import (
    _ID,
    _NAME,
    _TOPIC,
    ID_PATTERN,
    NAME_PATTERN,
    TOPIC_PATTERN,
    _invalid,
    check_name,
    check_topic,
    shown_key,
)

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_METADATA_ENTRIES",
    "MAX_DEPTH",
    "MAX_HEADER_CONTAINERS",
    "MAX_PAYLOAD_CONTAINERS",
    "MAX_QUOTE",
    "quote",
    "NAME_PATTERN",
    "TOPIC_PATTERN",
    "ID_PATTERN",
    "encode_header",
    "encode_command_header",
    "encode_response_header",
    "encode_event_header",
    "encode_stamped_event",
    "encode_cancel_header",
    "encode_progress_header",
    "decode_header",
    "unpack_header",
    "peek_header",
    "bounded_unpack",
    "encode_payload",
    "decode_payload",
    "encode",
    "decode",
    "check_size",
    "check_name",
    "check_topic",
    "shown_key",
    "canonical",
]

MAX_HEADER_BYTES: Final = 16 * 1024
MAX_MESSAGE_BYTES: Final = 1024 * 1024
MAX_METADATA_ENTRIES: Final = 64
# Nesting of maps and arrays in any value a peer sends: deep enough for real JSON-like
# data and schemas, far below Python's recursion limit (msgpack itself allows 1024, and
# repr, json and msgpack.packb fail on such values further along).
MAX_DEPTH: Final = 64
MAX_HEADER_CONTAINERS: Final = 256  # a header has a few maps; metadata is one level of 64
MAX_PAYLOAD_CONTAINERS: Final = 100_000  # about 10 ms of work at most to build or refuse
MAX_QUOTE: Final = 200  # characters of a peer's input an error message may repeat

_name_match = _NAME.fullmatch
_id_match = _ID.fullmatch
_unpackb = msgpack.unpackb
_CONTAINERS: Final = (dict, list)
_INF: Final = math.inf

_TYPES: Final = {t.value: t for t in MessageType}
_HEADER_KEYS: Final = frozenset(
    {"v", "type", "id", "ts", "service", "action", "topic", "seq", "correlation_id",
     "deadline", "metadata", "security", "error", "sender"}
)
# Types that answer or refer to one command, and so must name it.
_CORRELATED: Final = frozenset({"response", "cancel", "progress"})
_SECURITY_KEYS: Final = frozenset({"level", "encryption", "signature", "token"})
_ERROR_KEYS: Final = frozenset({"code", "message", "retryable", "details"})

class _TooManyContainers(Exception):
    """Raised from inside msgpack's hooks to stop building an oversized value."""


def _too_deep(value: Any, limit: int) -> bool:
    """Whether maps and arrays nest more than `limit` deep in `value` (no recursion)."""
    stack = [(value, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        item, depth = pop()
        if depth > limit:
            return True
        for child in item.values() if type(item) is dict else item:
            if type(child) in _CONTAINERS:
                push((child, depth + 1))
    return False


def bounded_unpack(frame: bytes, what: str, max_containers: int, **options: Any) -> Any:
    """One MessagePack value from a peer, refused past `max_containers` maps and arrays
    or `MAX_DEPTH` levels of nesting.

    The count is kept by msgpack's own hooks, so the refusal comes after at most
    `max_containers` objects were built, whatever the frame holds. Nesting is only
    walked when there are more containers than `MAX_DEPTH` (it cannot be deeper otherwise).

    Raises:
        BadFormatError: not exactly one MessagePack value, or over a bound
            (`details["reason"]` is "too many objects" or "too deep").
    """
    count = 0

    def hook(obj: Any) -> Any:
        nonlocal count
        count += 1
        if count > max_containers:
            raise _TooManyContainers
        return obj

    try:
        value = _unpackb(frame, raw=False, object_hook=hook, list_hook=hook, **options)
    except _TooManyContainers:
        raise BadFormatError(
            f"{what} holds more than {max_containers} maps and arrays",
            details={"reason": "too many objects", "limit": max_containers},
        ) from None
    except ValueError as exc:
        if isinstance(exc, msgpack.StackError):
            raise _too_deep_error(what) from None
        raise BadFormatError(f"{what} is not valid MessagePack ({type(exc).__name__})") from None
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types for bad input
        raise BadFormatError(f"{what} is not valid MessagePack ({type(exc).__name__})") from None
    if count > MAX_DEPTH and type(value) in _CONTAINERS and _too_deep(value, MAX_DEPTH):
        raise _too_deep_error(what)
    return value


def _too_deep_error(what: str) -> BadFormatError:
    return BadFormatError(
        f"{what} nests maps and arrays more than {MAX_DEPTH} deep", details={"reason": "too deep", "limit": MAX_DEPTH}
    )


def quote(value: object, limit: int = MAX_QUOTE) -> str:
    """A short, safe rendering of a value a peer sent, for error messages.

    Strings are cut to `limit` characters; other values are rendered by `reprlib`, which
    stops at a few levels and items, so a hostile value costs little and says little.
    """
    text = value if isinstance(value, str) else _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_REPR: Final = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 60


def _check_id(value: object, field: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise _invalid(field, "must be 1 to 64 printable ASCII characters without spaces")
    return value


def _check_number(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise _invalid(field, "must be a finite, non-negative number")
    return float(value)


def _check_map(value: object, field: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _invalid(field, "must be a map with string keys")
    return value


def _check_security(raw: object) -> None:
    sec = _check_map(raw, "security")
    unknown = set(sec) - _SECURITY_KEYS
    if unknown:
        raise _invalid(f"security.{quote(sorted(unknown)[0], 64)}", "unknown key")
    level = sec.get("level", 0)
    if isinstance(level, bool) or not isinstance(level, int) or level not in SecurityLevel._value2member_map_:
        raise _invalid("security.level", "must be 0, 1, 2 or 3")
    enc = sec.get("encryption")
    if enc is not None:
        _check_map(enc, "security.encryption")
    sig = sec.get("signature")
    if sig is not None and not isinstance(sig, bytes):
        raise _invalid("security.signature", "must be binary")
    token = sec.get("token")
    if token is not None and not isinstance(token, str):
        raise _invalid("security.token", "must be a string")


def _check_error(raw: object) -> None:
    err = _check_map(raw, "error")
    unknown = set(err) - _ERROR_KEYS
    if unknown:
        raise _invalid(f"error.{quote(sorted(unknown)[0], 64)}", "unknown key")
    code = err.get("code")
    if isinstance(code, bool) or not isinstance(code, int) or not 0 < code < 10000:
        raise _invalid("error.code", "must be an integer from 1 to 9999")
    message = err.get("message")
    if not isinstance(message, str):
        raise _invalid("error.message", "must be a string")
    retryable = err.get("retryable")
    if not isinstance(retryable, bool):
        raise _invalid("error.retryable", "must be a boolean")
    _check_map(err.get("details", {}), "error.details")


def _check_optional(raw: dict[Any, Any], mtype: str) -> None:
    """Check the fields only some header types carry (`unpack_header`'s second half)."""
    if "topic" in raw or mtype == "event":
        value = raw.get("topic")
        if type(value) is not str or not _TOPIC.fullmatch(value):
            raise _invalid("topic", "must be dot-separated names")
    if "seq" in raw:
        value = raw["seq"]
        if type(value) is not int or value < 1 or mtype != "event":
            raise _invalid("seq", "an event's positive integer sequence number")
    if "sender" in raw:
        value = raw["sender"]
        if type(value) is not str or not _name_match(value) or mtype != "event":
            raise _invalid("sender", "an event's publisher, named by the broker")
    if "correlation_id" in raw or mtype in _CORRELATED:
        value = raw.get("correlation_id")
        if type(value) is not str or not _id_match(value):
            _check_id(value, "correlation_id")
    if "deadline" in raw:
        value = raw["deadline"]
        if type(value) is not float or not 0.0 <= value < _INF:
            _check_number(value, "deadline")
    if "metadata" in raw and len(_check_map(raw["metadata"], "metadata")) > MAX_METADATA_ENTRIES:
        raise _invalid("metadata", f"at most {MAX_METADATA_ENTRIES} entries")
    if "security" in raw:
        _check_security(raw["security"])
    if mtype == "error":
        _check_error(raw.get("error"))
    elif "error" in raw:
        raise _invalid("error", "only error messages carry an error")


def unpack_header(frame: bytes) -> dict[str, Any]:
    """Decode and validate a header frame, returning its wire map.

    This is the broker's hot path: it checks everything `decode_header` checks but builds
    no records. The map's keys are the wire keys of docs/protocol.md.

    Raises:
        MessageTooLargeError: the frame is longer than MAX_HEADER_BYTES.
        BadFormatError: not a single MessagePack map.
        UnsupportedVersionError: `v` is not a version this peer speaks.
        ValidationFailedError: a field is missing, unknown or wrong; `details["field"]` names it.
    """
    if len(frame) > MAX_HEADER_BYTES:
        raise MessageTooLargeError(
            f"header is {len(frame)} bytes, limit {MAX_HEADER_BYTES}",
            details={"limit": MAX_HEADER_BYTES},
        )
    raw = bounded_unpack(frame, "header", MAX_HEADER_CONTAINERS)
    if type(raw) is not dict:
        raise BadFormatError("header must be a MessagePack map")
    version = raw.get("v")
    if version != PROTOCOL_VERSION or type(version) is not int:
        raise UnsupportedVersionError(
            f"protocol version {quote(version)} is not supported",
            details={"field": "v", "supported": [PROTOCOL_VERSION]},
        )
    if not raw.keys() <= _HEADER_KEYS:
        unknown = sorted(quote(str(k), 64) for k in raw if k not in _HEADER_KEYS)[0]
        raise _invalid(unknown, "unknown header key")
    mtype = raw.get("type")
    if type(mtype) is not str or mtype not in _TYPES:
        raise _invalid("type", "must be one of command, response, event, error, cancel, progress")
    value = raw.get("id")
    if type(value) is not str or not _id_match(value):
        _check_id(value, "id")
    value = raw.get("ts")
    if type(value) is not float or not 0.0 <= value < _INF:
        _check_number(value, "ts")
    if mtype == "command":
        value = raw.get("service")
        if type(value) is not str or not _name_match(value):
            check_name(value, "service")
        value = raw.get("action")
        if type(value) is not str or not _name_match(value):
            check_name(value, "action")
    else:
        if "service" in raw:
            value = raw["service"]
            if type(value) is not str or not _name_match(value):
                check_name(value, "service")
        if "action" in raw:
            value = raw["action"]
            if type(value) is not str or not _name_match(value):
                check_name(value, "action")
    _check_optional(raw, mtype)
    return raw


def peek_header(frame: bytes, key: str) -> Any:
    """One key of a header that failed validation, or None when it cannot be read.

    For salvage only (answering the right command about a bad reply); never trust it
    for routing or authorisation. A frame longer than a header may be is not read at all,
    and the rest within the header's bounds, so salvage costs no more than a header.
    """
    if len(frame) > MAX_HEADER_BYTES:
        return None
    try:
        raw = bounded_unpack(frame, "header", MAX_HEADER_CONTAINERS)
    except BadFormatError:
        return None
    return raw.get(key) if type(raw) is dict else None


def decode_header(frame: bytes) -> Header:
    """Decode and validate a header frame into a `Header`.

    Raises:
        MeshError: the errors `unpack_header` raises.
    """
    raw = unpack_header(frame)
    sec = raw.get("security")
    err = raw.get("error")
    return Header(
        type=_TYPES[raw["type"]],
        id=raw["id"],
        timestamp=float(raw["ts"]),
        service=raw.get("service"),
        action=raw.get("action"),
        topic=raw.get("topic"),
        seq=raw.get("seq"),
        correlation_id=raw.get("correlation_id"),
        deadline=float(raw["deadline"]) if "deadline" in raw else None,
        metadata=raw.get("metadata", {}),
        security=None if sec is None else SecurityInfo(
            SecurityLevel(sec.get("level", 0)), sec.get("encryption"), sec.get("signature"), sec.get("token")
        ),
        error=None if err is None else ErrorInfo(
            err["code"], err["message"], err["retryable"], err.get("details", {})
        ),
        version=raw["v"],
    )


def canonical(value: Any) -> Any:
    """Maps with their keys sorted, at every depth: equal headers give equal bytes (and
    equal signatures)."""
    if isinstance(value, Mapping):
        return {k: canonical(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    return value


def _header_map(h: Header) -> dict[str, Any]:
    out: dict[str, Any] = {"v": h.version, "type": h.type.value, "id": h.id, "ts": h.timestamp}
    if h.service is not None:
        out["service"] = h.service
    if h.action is not None:
        out["action"] = h.action
    if h.topic is not None:
        out["topic"] = h.topic
    if h.seq is not None:
        out["seq"] = h.seq
    if h.correlation_id is not None:
        out["correlation_id"] = h.correlation_id
    if h.deadline is not None:
        out["deadline"] = h.deadline
    if h.metadata:
        out["metadata"] = canonical(h.metadata)
    if h.security is not None:
        s = h.security
        # The order the SDK's `Sealer` writes (token first, the signature last).
        sec: dict[str, Any] = {"level": int(s.security_level)}
        if s.auth_token is not None:
            sec["token"] = s.auth_token
        if s.encryption_info is not None:
            sec["encryption"] = canonical(s.encryption_info)
        if s.signature is not None:
            sec["signature"] = s.signature
        out["security"] = sec
    if h.error is not None:
        e = h.error
        err: dict[str, Any] = {"code": e.code, "message": e.message, "retryable": e.retryable}
        if e.details:
            err["details"] = canonical(e.details)
        out["error"] = err
    return out


def encode_header(h: Header) -> bytes:
    """The header frame for `h` (deterministic bytes).

    Raises:
        ValidationFailedError: metadata holds a value MessagePack cannot carry.
    """
    try:
        return msgpack.packb(_header_map(h), use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise _invalid("metadata", f"cannot be encoded as MessagePack ({exc})") from None


def encode_command_header(
    service: str,
    action: str,
    *,
    id: str,
    now: float,
    deadline: float | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> bytes:
    """The same bytes as `encode_header(command(...))`, without building the record.

    The clients' hot path; `test_fast_encoders` holds the two to the same output.

    Raises:
        ValidationFailedError: a bad name, or metadata MessagePack cannot carry.
    """
    check_name(service, "service")
    check_name(action, "action")
    out: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": "command", "id": id, "ts": now,
                           "service": service, "action": action}
    if deadline is not None:
        out["deadline"] = deadline
    return _pack_with_metadata(out, metadata)


def _pack_with_metadata(out: dict[str, Any], metadata: Mapping[str, Any] | None) -> bytes:
    if metadata:
        out["metadata"] = canonical(metadata)
    try:
        return msgpack.packb(out, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise _invalid("metadata", f"cannot be encoded as MessagePack ({exc})") from None


def encode_event_header(
    topic: str, *, id: str, now: float, metadata: Mapping[str, Any] | None = None
) -> bytes:
    """The same bytes as `encode_header(event(...))`, without building the record.

    Raises:
        ValidationFailedError: a bad topic, or metadata MessagePack cannot carry.
    """
    check_topic(topic)
    return _pack_with_metadata(
        {"v": PROTOCOL_VERSION, "type": "event", "id": id, "ts": now, "topic": topic}, metadata
    )


def encode_stamped_event(published: Mapping[str, Any], seq: int, sender: str | None = None) -> bytes:
    """The header subscribers receive for an event a publisher sent (its wire map).

    The broker's hot path for events: the publisher's id, time, topic and metadata, the
    sequence number the broker gave it, the publisher's `security` map without its token
    (so subscribers can check a signature and decrypt), and `sender`: the publisher's
    authenticated name (its CURVE key's), when security is on. A `sender` the publisher
    wrote itself is never kept.
    """
    out = {"v": PROTOCOL_VERSION, "type": "event", "id": published["id"], "ts": published["ts"],
           "topic": published["topic"], "seq": seq}
    if "metadata" in published:
        out["metadata"] = published["metadata"]
    sec = published.get("security")
    if sec:
        out["security"] = {k: v for k, v in sec.items() if k != "token"}
    if sender is not None:
        out["sender"] = sender
    return msgpack.packb(out, use_bin_type=True)


def encode_cancel_header(command_id: str, *, now: float, id: str | None = None) -> bytes:
    """The header of a `cancel` for the command `command_id` (client to broker to node).

    The same bytes as `encode_header` of the equal `Header`; `id` defaults to a fresh one.
    """
    return msgpack.packb(
        {"v": PROTOCOL_VERSION, "type": "cancel", "id": id or new_id(), "ts": now, "correlation_id": command_id},
        use_bin_type=True,
    )


def encode_progress_header(command_id: str, *, now: float, id: str | None = None) -> bytes:
    """The header of a `progress` report on the command `command_id` (node to broker to client).

    The same bytes as `encode_header` of the equal `Header`; `id` defaults to a fresh one.
    """
    return msgpack.packb(
        {"v": PROTOCOL_VERSION, "type": "progress", "id": id or new_id(), "ts": now, "correlation_id": command_id},
        use_bin_type=True,
    )


def encode_response_header(request: Mapping[str, Any], now: float) -> bytes:
    """The same bytes as `encode_header(response_to(...))` for a command's wire map.

    The nodes' hot path: `request` is what `unpack_header` returned for the command (or
    for an event the broker acknowledges: the acknowledgement names no service, whatever
    optional fields the event carried).
    """
    if request["type"] == "command":
        out = {"v": PROTOCOL_VERSION, "type": "response", "id": new_id(), "ts": now,
               "service": request["service"], "action": request["action"], "correlation_id": request["id"]}
    else:
        out = {"v": PROTOCOL_VERSION, "type": "response", "id": new_id(), "ts": now, "correlation_id": request["id"]}
    return msgpack.packb(out, use_bin_type=True)


def encode_payload(value: Any) -> bytes:
    """The payload frame for any MessagePack-able value.

    Raises:
        ValidationFailedError: the value has a type MessagePack cannot carry.
    """
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise _invalid("payload", f"cannot be encoded as MessagePack ({exc})") from None


def decode_payload(frame: bytes) -> Any:
    """Decode a payload frame: exactly one MessagePack value.

    Map keys may be any MessagePack scalar, as `encode_payload` allows. Bounded like
    every decode of peer input (`bounded_unpack`, `MAX_PAYLOAD_CONTAINERS`, `MAX_DEPTH`).

    Raises:
        BadFormatError: empty, truncated, trailing bytes, not MessagePack, or over a bound.
    """
    return bounded_unpack(frame, "payload", MAX_PAYLOAD_CONTAINERS, strict_map_key=False)


def check_size(frames: Sequence[bytes], limit: int = MAX_MESSAGE_BYTES) -> None:
    """Refuse a message whose frames together exceed `limit` bytes."""
    total = sum(map(len, frames))
    if total > limit:
        raise MessageTooLargeError(
            f"message is {total} bytes, limit {limit}", details={"limit": limit}
        )


def encode(msg: Message) -> list[bytes]:
    """The two frames of `msg`: header, payload."""
    return [encode_header(msg.header), encode_payload(msg.payload)]


def decode(frames: Sequence[bytes], limit: int = MAX_MESSAGE_BYTES) -> Message:
    """Decode a whole two-frame message, header and payload.

    Raises:
        BadFormatError: not exactly two frames, or a frame that is not MessagePack.
        MeshError: any error `decode_header` raises.
    """
    if len(frames) != 2:
        raise BadFormatError(
            f"a message has 2 frames (header, payload), got {len(frames)}",
            details={"frames": len(frames)},
        )
    check_size(frames, limit)
    return Message(decode_header(frames[0]), decode_payload(frames[1]))

