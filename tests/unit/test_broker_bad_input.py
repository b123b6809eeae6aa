"""Malformed frames from clients and nodes are answered with an error code, counted, and survived."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.broker import Broker, BrokerConfig, Side
from mesh.protocol import (
    ErrorCode,
    InternalError,
    MessageType,
    command,
    encode_header,
    encode_payload,
    error_to,
    response_to,
)
from mesh.testing.frames import (
    CLIENT,
    CLIENT_B,
    NODE_A,
    NODE_B,
    command_frames,
    dispatched_ids,
    error_of,
    header_of,
    node_system,
    only,
    register,
    registration,
    reply,
)

LIMIT = 4096
_DROP = object()  # marks a header or registration field to leave out


@pytest.fixture
def broker() -> Broker:
    b = Broker(BrokerConfig(max_message_bytes=LIMIT))
    register(b, NODE_A, {"echo": ["say"]}, capacity=4)
    return b


def _raw_header(**fields: Any) -> bytes:
    base: dict[str, Any] = {"v": 1, "type": "command", "id": "c1", "ts": 0.0, "service": "echo", "action": "say"}
    base.update(fields)
    return msgpack.packb({k: v for k, v in base.items() if v is not _DROP}, use_bin_type=True)


_GOOD = command_frames("echo", "say", id="c1")
_RESPONSE = encode_header(response_to(command("echo", "say", now=0.0, id="c0"), now=0.0))
_ERROR = encode_header(error_to(command("echo", "say", now=0.0, id="c0"), InternalError("boom"), now=0.0))
_EVENT = msgpack.packb({"v": 1, "type": "event", "id": "e1", "ts": 0.0, "topic": "a.b"})

CLIENT_CASES = {
    "no frames": ([], ErrorCode.BAD_FORMAT),
    "one frame": ([_GOOD[0]], ErrorCode.BAD_FORMAT),
    "three frames": ([b"", *_GOOD], ErrorCode.BAD_FORMAT),
    "random bytes header": ([b"\xc1\x00\xffgarbage", b"\xc0"], ErrorCode.BAD_FORMAT),
    "empty header": ([b"", b"\xc0"], ErrorCode.BAD_FORMAT),
    "header not a map": ([msgpack.packb([1, 2, 3]), b"\xc0"], ErrorCode.BAD_FORMAT),
    "truncated msgpack": ([_GOOD[0][:-3], b"\xc0"], ErrorCode.BAD_FORMAT),
    "trailing bytes": ([_GOOD[0] + b"\x00", b"\xc0"], ErrorCode.BAD_FORMAT),
    "unknown version": ([_raw_header(v=2), b"\xc0"], ErrorCode.UNSUPPORTED_VERSION),
    "missing version": ([_raw_header(v=_DROP), b"\xc0"], ErrorCode.UNSUPPORTED_VERSION),
    "boolean version": ([_raw_header(v=True), b"\xc0"], ErrorCode.UNSUPPORTED_VERSION),
    "missing service": ([_raw_header(service=_DROP), b"\xc0"], ErrorCode.VALIDATION_FAILED),
    "bad action name": ([_raw_header(action="no spaces"), b"\xc0"], ErrorCode.VALIDATION_FAILED),
    "unknown header key": ([_raw_header(extra=1), b"\xc0"], ErrorCode.VALIDATION_FAILED),
    "bad id": ([_raw_header(id=""), b"\xc0"], ErrorCode.VALIDATION_FAILED),
    "negative deadline": ([_raw_header(deadline=-1), b"\xc0"], ErrorCode.VALIDATION_FAILED),
    "oversized payload": ([_GOOD[0], b"x" * LIMIT], ErrorCode.MESSAGE_TOO_LARGE),
    "oversized header": ([b"\x00" * (16 * 1024 + 1), b""], ErrorCode.MESSAGE_TOO_LARGE),
    "response from client": ([_RESPONSE, b"\xc0"], ErrorCode.INVALID_STATE),
    "error from client": ([_ERROR, b"\xc0"], ErrorCode.INVALID_STATE),
    "event with a bad topic": ([_raw_header(type="event", topic="a..b"), b"\xc0"], ErrorCode.VALIDATION_FAILED),
}

_CLIENT_PARAMS = [pytest.param(frames, code, id=name) for name, (frames, code) in CLIENT_CASES.items()]


@pytest.mark.parametrize(("frames", "code"), _CLIENT_PARAMS)
def test_bad_client_message_gets_error_code(broker: Broker, frames: list[bytes], code: ErrorCode) -> None:
    """Each kind of bad client message is answered to that client with its error code."""
    side, ident, out = only(broker.client_message(CLIENT, frames, 1.0))
    assert (side, ident) == (Side.CLIENT, CLIENT)
    assert len(out) == 2
    err = error_of(out)
    assert err.code == code
    assert err.retryable is False
    assert broker.registry.nodes[NODE_A].in_flight == 0
    assert not broker.commands


@pytest.mark.parametrize(("frames", "code"), _CLIENT_PARAMS)
def test_bad_client_message_is_counted(broker: Broker, frames: list[bytes], code: ErrorCode) -> None:
    """Each kind of bad client message is counted as malformed (and as a message in)."""
    before = broker.counters["messages_in"]
    broker.client_message(CLIENT, frames, 1.0)
    assert broker.counters["messages_in"] == before + 1
    assert broker.counters["malformed"] == 1


def test_oversized_header_beyond_codec_limit() -> None:
    """A header over the 16 KiB header limit is MESSAGE_TOO_LARGE even if the message limit allows it."""
    broker = Broker(BrokerConfig(max_message_bytes=1024 * 1024))
    frames = [_raw_header(metadata={"k": "x" * 17000}), b"\xc0"]
    _, _, out = only(broker.client_message(CLIENT, frames, 1.0))
    assert error_of(out).code == ErrorCode.MESSAGE_TOO_LARGE


def test_message_exactly_at_the_limit_is_routed(broker: Broker) -> None:
    """A message of exactly `max_message_bytes` is accepted; one byte more is refused."""
    header = command_frames("echo", "say", id="c1")[0]
    fits = [header, b"x" * (LIMIT - len(header))]
    assert dispatched_ids(broker.client_message(CLIENT, fits, 1.0)) == ["c1"]
    over = [header, b"x" * (LIMIT - len(header) + 1)]
    _, _, out = only(broker.client_message(CLIENT, over, 1.0))
    assert error_of(out).code == ErrorCode.MESSAGE_TOO_LARGE
    assert error_of(out).details == {"limit": LIMIT}


def test_validation_error_names_the_field(broker: Broker) -> None:
    """A header failing validation is answered with details naming the field."""
    _, _, out = only(broker.client_message(CLIENT, [_raw_header(action=_DROP), b"\xc0"], 1.0))
    err = error_of(out)
    assert err.details["field"] == "action"


def test_validation_error_correlates_to_a_readable_id(broker: Broker) -> None:
    """A command with a readable id but an invalid field gets an error correlated to that id."""
    _, _, out = only(broker.client_message(CLIENT, [_raw_header(id="c9", action="no spaces"), b"\xc0"], 1.0))
    assert header_of(out).correlation_id == "c9"


def test_broker_keeps_routing_after_bad_input(broker: Broker) -> None:
    """After every kind of bad input from one client, another client's command is routed."""
    for frames, _ in CLIENT_CASES.values():
        broker.client_message(CLIENT_B, frames, 1.0)
    out = broker.client_message(CLIENT, command_frames("echo", "say", id="ok"), 2.0)
    assert dispatched_ids(out) == ["ok"]
    side, ident, f = only(broker.node_message(NODE_A, reply(only(out)[2]), 3.0))
    assert (side, ident) == (Side.CLIENT, CLIENT)
    assert header_of(f).type is MessageType.RESPONSE


def test_bad_input_from_a_client_does_not_touch_its_commands(broker: Broker) -> None:
    """A bad message does not disturb the same client's command already in flight."""
    d = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))[2]
    broker.client_message(CLIENT, [b"junk"], 1.5)
    assert only(broker.node_message(NODE_A, reply(d), 2.0))[1] == CLIENT


# ------------------------------------------------------------------- node side

_DISPATCH_ENV = CLIENT

NODE_CASES = {
    "no frames": ([], ErrorCode.BAD_FORMAT),
    "two frames": (list(_GOOD), ErrorCode.BAD_FORMAT),
    "four frames": ([b"", b"", *_GOOD], ErrorCode.BAD_FORMAT),
    "random bytes header": ([_DISPATCH_ENV, b"\xc1\xc1", b"\xc0"], ErrorCode.BAD_FORMAT),
    "truncated msgpack": ([_DISPATCH_ENV, _RESPONSE[:-2], b"\xc0"], ErrorCode.BAD_FORMAT),
    "unknown version": ([_DISPATCH_ENV, _raw_header(v=99), b"\xc0"], ErrorCode.UNSUPPORTED_VERSION),
    "invalid field": ([_DISPATCH_ENV, _raw_header(ts="now"), b"\xc0"], ErrorCode.VALIDATION_FAILED),
    "oversized": ([_DISPATCH_ENV, _RESPONSE, b"x" * LIMIT], ErrorCode.MESSAGE_TOO_LARGE),
    "command sent as a reply": ([_DISPATCH_ENV, *_GOOD], ErrorCode.BAD_FORMAT),
    "event sent as a reply": ([_DISPATCH_ENV, _EVENT, b"\xc0"], ErrorCode.BAD_FORMAT),
    "error reply without correlation": (
        [_DISPATCH_ENV, msgpack.packb({"v": 1, "type": "error", "id": "x1", "ts": 0.0,
                                       "error": {"code": 3003, "message": "m", "retryable": False}}),
         b"\xc0"],
        ErrorCode.BAD_FORMAT,
    ),
}


@pytest.mark.parametrize(("frames", "code"), [pytest.param(f, c, id=n) for n, (f, c) in NODE_CASES.items()])
def test_bad_node_message_gets_error_code(broker: Broker, frames: list[bytes], code: ErrorCode) -> None:
    """Each kind of bad node message is answered to that node ([b"", header, payload]) with its code."""
    side, ident, out = only(broker.node_message(NODE_A, frames, 1.0))
    assert (side, ident) == (Side.NODE, NODE_A)
    assert len(out) == 3 and out[0] == b""
    assert error_of(out).code == code
    assert broker.counters["malformed"] == 1


@pytest.mark.parametrize(
    ("header", "payload", "node_code", "client_code"),
    [
        pytest.param(
            None, b"x" * LIMIT, ErrorCode.MESSAGE_TOO_LARGE, ErrorCode.MESSAGE_TOO_LARGE, id="oversized"
        ),
        pytest.param(
            {"ts": "later"}, b"\xc0", ErrorCode.VALIDATION_FAILED, ErrorCode.INTERNAL, id="invalid field"
        ),
        pytest.param(
            {"v": 7}, b"\xc0", ErrorCode.UNSUPPORTED_VERSION, ErrorCode.INTERNAL, id="unknown version"
        ),
    ],
)
def test_unusable_reply_to_a_dispatch_answers_the_client(
    broker: Broker,
    header: dict[str, Any] | None,
    payload: bytes,
    node_code: ErrorCode,
    client_code: ErrorCode,
) -> None:
    """A node's unusable reply to a command it runs is refused to the node and fails the command for the client."""
    d = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))[2]
    good = reply(d)
    raw = msgpack.unpackb(good[1])
    raw.update(header or {})
    bad = [good[0], msgpack.packb(raw, use_bin_type=True), payload]
    out = broker.node_message(NODE_A, bad, 2.0)
    to_node = [f for s, i, f in out if (s, i) == (Side.NODE, NODE_A)]
    to_client = [f for s, i, f in out if (s, i) == (Side.CLIENT, CLIENT)]
    assert len(to_node) == 1
    node_err = error_of(to_node[0])
    assert node_err.code == node_code
    assert len(to_client) == 1
    assert header_of(to_client[0]).correlation_id == "c1"
    client_err = error_of(to_client[0])
    assert client_err.code == client_code
    if client_code == ErrorCode.INTERNAL:
        # The client learns the node is at fault, with the node's problem quoted.
        assert client_err.message == f"the node sent an unusable reply: {node_err.message}"
        # ...and that the peer caused it, not a handler: the remote/local split in details.
        assert client_err.details == {"cause": "node_reply", "problem": int(node_code)}
    else:
        assert client_err.message == node_err.message
    assert not broker.commands
    assert broker.registry.nodes[NODE_A].in_flight == 0
    assert not broker.node_links[NODE_A].pending_commands
    assert broker.counters["failed"] == 1
    assert broker.counters[f"error_{int(client_code)}"] == 1


def test_unusable_reply_frees_the_slot_for_a_queued_command(broker: Broker) -> None:
    """After a node's unusable reply, its freed slot takes the next queued command."""
    ds = [only(broker.client_message(CLIENT, command_frames("echo", "say", id=f"c{i}"), 1.0))[2] for i in range(4)]
    assert broker.client_message(CLIENT, command_frames("echo", "say", id="q1"), 1.0) == []
    good = reply(ds[0])
    out = broker.node_message(NODE_A, [good[0], good[1], b"x" * LIMIT], 2.0)
    assert dispatched_ids(out) == ["q1"]


def test_unusable_reply_to_another_nodes_command_is_only_refused(broker: Broker) -> None:
    """An unusable reply naming a command of another node does not fail that command."""
    register(broker, NODE_B, {"kv": ["get"]})
    d = only(broker.client_message(CLIENT, command_frames("echo", "say", id="c1"), 1.0))[2]
    good = reply(d)
    out = broker.node_message(NODE_B, [good[0], good[1], b"x" * LIMIT], 2.0)
    assert [(s, i) for s, i, _ in out] == [(Side.NODE, NODE_B)]
    assert (CLIENT, "c1") in broker.commands


def test_node_command_to_another_service_is_refused(broker: Broker) -> None:
    """A node's own command (envelope b"") to a non-system service is answered HANDLER_NOT_FOUND."""
    out = broker.node_message(NODE_A, [b"", *command_frames("echo", "say", id="n1")], 1.0)
    side, ident, frames = only(out)
    assert (side, ident, frames[0]) == (Side.NODE, NODE_A, b"")
    assert error_of(frames).code == ErrorCode.HANDLER_NOT_FOUND
    assert header_of(frames).correlation_id == "n1"
    assert not broker.commands


def test_node_non_reply_is_counted(broker: Broker) -> None:
    """A node's own message that is not a reply, an event or a mesh.* command is counted as malformed."""
    broker.node_message(NODE_A, [b"", command_frames("echo", "say", id="n1")[0], b"\xc0"], 1.0)
    assert broker.counters["malformed"] == 1


def test_node_acknowledgement_with_empty_envelope_is_ignored(broker: Broker) -> None:
    """A response or error with envelope b"" (answering the broker) is accepted silently."""
    assert broker.node_message(NODE_A, [b"", _RESPONSE, b"\xc0"], 1.0) == []
    assert broker.node_message(NODE_A, [b"", _ERROR, b"\xc0"], 1.0) == []
    assert broker.counters["malformed"] == 0


def test_reply_for_unknown_command_is_dropped(broker: Broker) -> None:
    """A well-formed reply that matches no command is neither forwarded nor answered, only counted."""
    assert broker.node_message(NODE_B, [CLIENT, _RESPONSE, b"\xc0"], 1.0) == []
    assert broker.node_message(NODE_A, [CLIENT, _RESPONSE, b"\xc0"], 1.0) == []
    assert broker.counters["unexpected_replies"] == 2
    assert broker.counters["late_replies"] == 0
    assert broker.counters["malformed"] == 0


def test_broker_keeps_routing_after_bad_node_input(broker: Broker) -> None:
    """After every kind of bad input from a node, that node still gets and answers commands."""
    for frames, _ in NODE_CASES.values():
        broker.node_message(NODE_A, frames, 1.0)
    out = broker.client_message(CLIENT, command_frames("echo", "say", id="ok"), 2.0)
    assert dispatched_ids(out) == ["ok"]
    assert only(broker.node_message(NODE_A, reply(only(out)[2]), 3.0))[1] == CLIENT


# -------------------------------------------------------------- registration


def _with(**changes: Any) -> dict[str, Any]:
    payload = registration({"kv": {"get": {"description": "d", "schema": {}, "idempotent": False}}}, capacity=2)
    for path, value in changes.items():
        target = payload
        keys = path.split("__")
        for k in keys[:-1]:
            target = target[k]
        if value is _DROP:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value
    return payload


_GET = "services.kv.actions.get"
REGISTRATION_CASES = {
    "payload not a map": ([1, 2], "payload"),
    "missing name": (_with(name=_DROP), "name"),
    "empty name": (_with(name=""), "name"),
    "long name": (_with(name="n" * 129), "name"),
    "zero capacity": (_with(capacity=0), "capacity"),
    "boolean capacity": (_with(capacity=True), "capacity"),
    "float capacity": (_with(capacity=2.0), "capacity"),
    "huge capacity": (_with(capacity=10_001), "capacity"),
    "no services": (_with(services={}), "services"),
    "services not a map": (_with(services=["kv"]), "services"),
    "reserved service": (_with(services={"mesh": {"actions": {"x": {}}}}), "services.mesh"),
    "bad service name": (_with(services={"bad name": {"actions": {"x": {}}}}), "services.bad name"),
    "no actions": (_with(services__kv__actions={}), "services.kv.actions"),
    "actions not a map": (_with(services__kv={"actions": ["get"]}), "services.kv.actions"),
    "bad action name": (_with(services__kv__actions={"g et": {}}), "services.kv.actions.g et"),
    "action spec not a map": (_with(services__kv__actions__get="x"), "services.kv.actions.get"),
    "description not a string": (_with(services__kv__actions__get__description=5), f"{_GET}.description"),
    "description too long": (_with(services__kv__actions__get__description="d" * 4097), f"{_GET}.description"),
    "schema not a map": (_with(services__kv__actions__get__schema=[1]), f"{_GET}.schema"),
    "idempotent not a bool": (_with(services__kv__actions__get__idempotent="yes"), f"{_GET}.idempotent"),
}


@pytest.mark.parametrize(("payload", "field"), [pytest.param(p, f, id=n) for n, (p, f) in REGISTRATION_CASES.items()])
def test_invalid_registration_is_refused_naming_the_field(payload: Any, field: str) -> None:
    """An invalid `mesh.register` payload is refused VALIDATION_FAILED with the offending field."""
    broker = Broker()
    side, ident, out = only(broker.node_message(NODE_A, node_system("register", payload, id="r1"), 1.0))
    assert (side, ident, out[0]) == (Side.NODE, NODE_A, b"")
    err = error_of(out)
    assert err.code == ErrorCode.VALIDATION_FAILED
    assert err.details["field"] == field
    assert header_of(out).correlation_id == "r1"
    assert NODE_A not in broker.registry.nodes
    assert broker.counters["registrations"] == 0
    assert broker.counters["error_1002"] == 1


def test_registration_payload_not_msgpack_is_bad_format() -> None:
    """A `mesh.register` whose payload frame is not MessagePack is answered BAD_FORMAT."""
    broker = Broker()
    frames = [b"", encode_header(command("mesh", "register", now=0.0)), b"\xc1"]
    _, _, out = only(broker.node_message(NODE_A, frames, 1.0))
    assert error_of(out).code == ErrorCode.BAD_FORMAT
    assert NODE_A not in broker.registry.nodes


def test_refused_reregistration_keeps_the_old_one(broker: Broker) -> None:
    """A registered node sending an invalid registration keeps its previous services."""
    _, _, out = only(broker.node_message(NODE_A, node_system("register", _with(capacity=0)), 1.0))
    assert error_of(out).code == ErrorCode.VALIDATION_FAILED
    assert broker.registry.offers("echo", "say")
    assert broker.registry.nodes[NODE_A].capacity == 4


def test_encode_payload_of_registration_round_trips() -> None:
    """The frame factory's registration is accepted as is (sanity check of the helper)."""
    broker = Broker()
    out = broker.node_message(NODE_A, [b"", encode_header(command("mesh", "register", now=0.0)),
                                       encode_payload(registration({"kv": ["get"]}))], 1.0)
    assert header_of(only(out)[2]).type is MessageType.RESPONSE


# ------------------------------------------------------------------ fuzzing

_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
_header_maps = st.dictionaries(
    st.sampled_from(["v", "type", "id", "ts", "service", "action", "topic", "correlation_id",
                     "deadline", "metadata", "security", "error", "x"]),
    st.one_of(st.sampled_from([1, "command", "response", "error", "event", "c1", "echo", "say", 0.0]),
              _msgpack_values),
    max_size=12,
)


_frames = st.lists(
    st.one_of(st.binary(max_size=64), _header_maps.map(lambda m: msgpack.packb(m, use_bin_type=True))),
    max_size=4,
)


@settings(max_examples=300, deadline=None)
@given(frames=_frames)
def test_client_frames_never_raise(frames: list[bytes]) -> None:
    """Any frames from a client are routed or answered to that client; nothing raises."""
    broker = Broker(BrokerConfig(max_message_bytes=LIMIT))
    register(broker, NODE_A, {"echo": ["say"]}, capacity=4)
    out = broker.client_message(CLIENT, frames, 1.0)
    assert len(out) == 1
    side, ident, f = out[0]
    assert (side, ident) in ((Side.CLIENT, CLIENT), (Side.NODE, NODE_A))
    if side is Side.CLIENT:
        assert header_of(f).type in (MessageType.ERROR, MessageType.RESPONSE)


@settings(max_examples=300, deadline=None)
@given(frames=_frames)
def test_node_frames_never_raise(frames: list[bytes]) -> None:
    """Any frames from a node are accepted, answered to that node, or dropped; nothing raises."""
    broker = Broker(BrokerConfig(max_message_bytes=LIMIT))
    register(broker, NODE_A, {"echo": ["say"]}, capacity=4)
    for side, ident, _ in broker.node_message(NODE_A, frames, 1.0):
        assert (side, ident) == (Side.NODE, NODE_A)


@settings(max_examples=300, deadline=None)
@given(payload=st.one_of(
    _msgpack_values,
    st.fixed_dictionaries(
        {"name": st.one_of(st.just("n"), _msgpack_values), "capacity": st.one_of(st.just(2), _msgpack_values)},
        optional={"services": st.one_of(
            _msgpack_values,
            st.dictionaries(st.sampled_from(["kv", "mesh", "b d", ""]), st.one_of(
                _msgpack_values,
                st.fixed_dictionaries({"actions": st.one_of(_msgpack_values, st.dictionaries(
                    st.sampled_from(["get", "x y"]), _msgpack_values, max_size=2))}),
            ), max_size=2),
        )},
    ),
))
def test_registration_payloads_never_raise(payload: object) -> None:
    """Any `mesh.register` payload registers the node or is refused with a protocol error code."""
    broker = Broker()
    side, ident, out = only(broker.node_message(NODE_A, node_system("register", payload), 1.0))
    assert (side, ident) == (Side.NODE, NODE_A)
    h = header_of(out)
    if h.type is MessageType.ERROR:
        assert h.error is not None
        assert h.error.code in (ErrorCode.VALIDATION_FAILED, ErrorCode.BAD_FORMAT)
        assert NODE_A not in broker.registry.nodes
    else:
        assert NODE_A in broker.registry.nodes


# The header {"v": 1, "type": []}: msgpack decodes "type" to a list, which once raised
# TypeError (unhashable) out of the codec and the broker core (fixed in c471e6e).
_UNHASHABLE_TYPE = [
    pytest.param(msgpack.packb({"v": 1, "type": []}), id="type is a list"),
    pytest.param(msgpack.packb({"v": 1, "type": {}, "id": "c1", "ts": 0}), id="type is a map"),
]


@pytest.mark.parametrize("header", _UNHASHABLE_TYPE)
def test_client_header_with_unhashable_type_is_bad_input(broker: Broker, header: bytes) -> None:
    """A client header whose `type` is a list or map is answered VALIDATION_FAILED, not raised."""
    _, _, out = only(broker.client_message(CLIENT, [header, b"\xc0"], 1.0))
    assert error_of(out).code == ErrorCode.VALIDATION_FAILED
    assert error_of(out).details["field"] == "type"


@pytest.mark.parametrize("header", _UNHASHABLE_TYPE)
def test_node_header_with_unhashable_type_is_bad_input(broker: Broker, header: bytes) -> None:
    """A node header whose `type` is a list or map is answered VALIDATION_FAILED, not raised."""
    _, _, out = only(broker.node_message(NODE_A, [CLIENT, header, b"\xc0"], 1.0))
    assert error_of(out).code == ErrorCode.VALIDATION_FAILED
