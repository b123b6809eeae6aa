"""What a node may register, and `mesh.services` in pages: sans-IO, through the broker core.

Every refused registration is answered to the node with its code and the field at
fault, and leaves the registry as it was; `mesh.services` answers always fit half a
message, whatever the nodes registered.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from mesh.broker import Broker, BrokerConfig, Side
from mesh.broker.secure import BrokerSecurity
from mesh.node import Node
from mesh.protocol import (
    MAX_ACTIONS,
    MAX_MESSAGE_BYTES,
    MAX_REGISTRATION_BYTES,
    MAX_SCHEMA_BYTES,
    ConfigurationError,
    ErrorCode,
    MessageTooLargeError,
    MessageType,
    ValidationFailedError,
    encode_payload,
)
from mesh.protocol.metaschema import DRAFT_07
from mesh.security.gate import Gate, GateSettings, Peer
from mesh.security.policy import parse_policy
from mesh.security.tokens import TokenSettings, TokenVerifier
from mesh.testing.frames import (
    CLIENT,
    NODE_A,
    NODE_B,
    command_frames,
    error_of,
    header_of,
    node_system,
    only,
    payload_of,
    register,
    registration,
    system,
)

GET = "services.kv.actions.get"
PADDING = "x" * (MAX_SCHEMA_BYTES - 100)  # a description that makes a schema just under the limit


def with_schema(schema: Any) -> dict[str, Any]:
    """A registration of kv.get with `schema`."""
    return registration({"kv": {"get": {"description": "d", "schema": schema}}})


def with_spec(**spec: Any) -> dict[str, Any]:
    """A registration of kv.get whose entry also holds `spec` (hints, result schema)."""
    return registration({"kv": {"get": {"description": "d", **spec}}})


def big_schema(tag: str) -> dict[str, Any]:
    """A valid schema of nearly MAX_SCHEMA_BYTES."""
    return {"type": "object", "description": f"{tag}{PADDING}"}


def many_services(count: int) -> dict[str, Any]:
    return registration({f"s{i}": ["a"] for i in range(count)})


def with_services(services: dict[Any, Any]) -> dict[str, Any]:
    payload = registration({"kv": ["get"]})
    payload["services"] = services
    return payload


REFUSED: dict[str, tuple[dict[str, Any], ErrorCode, str]] = {
    "integer service key": (with_services({1: {"actions": {"a": {}}}}), ErrorCode.VALIDATION_FAILED, "services.1"),
    "bytes service key": (with_services({b"kv": {"actions": {"a": {}}}}), ErrorCode.VALIDATION_FAILED, "services.b'kv'"),
    "integer action key": (with_services({"kv": {"actions": {7: {}}}}), ErrorCode.VALIDATION_FAILED, "services.kv.actions.7"),
    "service spec not a map": (with_services({"kv": ["get"]}), ErrorCode.VALIDATION_FAILED, "services.kv.actions"),
    "exactly_once not a bool": (registration({"kv": {"get": {"exactly_once": 1}}}), ErrorCode.VALIDATION_FAILED,
                                f"{GET}.exactly_once"),
    "type 12": (with_schema({"type": 12}), ErrorCode.VALIDATION_FAILED, f"{GET}.schema.type"),
    "required not a list": (with_schema({"required": "key"}), ErrorCode.VALIDATION_FAILED, f"{GET}.schema.required"),
    "bad pattern": (with_schema({"pattern": "("}), ErrorCode.VALIDATION_FAILED, f"{GET}.schema.pattern"),
    "$ref to itself": (with_schema({"$ref": "#"}), ErrorCode.VALIDATION_FAILED, f"{GET}.schema.$ref"),
    "$ref cycle of two": (
        with_schema({"$ref": "#/definitions/a",
                     "definitions": {"a": {"$ref": "#/definitions/b"}, "b": {"$ref": "#/definitions/a"}}}),
        ErrorCode.VALIDATION_FAILED, f"{GET}.schema.definitions.a.$ref"),
    "recursive $ref through items": (
        with_schema({"type": "array", "items": {"$ref": "#"}}), ErrorCode.VALIDATION_FAILED, f"{GET}.schema.items.$ref"),
    "remote $ref": (with_schema({"$ref": "http://127.0.0.1:9/schema.json"}), ErrorCode.VALIDATION_FAILED,
                    f"{GET}.schema.$ref"),
    "unresolved $ref": (with_schema({"$ref": "#/definitions/nope"}), ErrorCode.VALIDATION_FAILED, f"{GET}.schema.$ref"),
    "$ref to a non-schema": (with_schema({"required": ["a"], "$ref": "#/required"}), ErrorCode.VALIDATION_FAILED,
                             f"{GET}.schema.$ref"),
    "$ref to a bad hidden schema": (with_schema({"x-hidden": {"type": 12}, "$ref": "#/x-hidden"}),
                                    ErrorCode.VALIDATION_FAILED, f"{GET}.schema.$ref"),
    "$ref to data, not a schema": (with_schema({"properties": {"a": {"enum": [{"type": "string"}]}},
                                                "$ref": "#/properties/a/enum/0"}),
                                   ErrorCode.VALIDATION_FAILED, f"{GET}.schema.$ref"),
    "$id below the root": (with_schema({"properties": {"a": {"$id": "http://x/a"}}}), ErrorCode.VALIDATION_FAILED,
                           f"{GET}.schema.properties.a.$id"),
    "another draft": (with_schema({"$schema": "http://json-schema.org/draft-04/schema#"}), ErrorCode.VALIDATION_FAILED,
                      f"{GET}.schema.$schema"),
    "integer key in a schema": (with_schema({"properties": {1: {}}}), ErrorCode.VALIDATION_FAILED,
                                f"{GET}.schema.properties"),
    "bytes in a schema": (with_schema({"description": b"\x00"}), ErrorCode.VALIDATION_FAILED,
                          f"{GET}.schema.description"),
    "NaN in a schema": (with_schema({"minimum": float("nan")}), ErrorCode.VALIDATION_FAILED, f"{GET}.schema.minimum"),
    "nested too deep": (with_schema(eval("{'not': " * 40 + "{}" + "}" * 40)), ErrorCode.VALIDATION_FAILED,
                        f"{GET}.schema" + ".not" * 32),
    "schema over the limit": (with_schema({"description": "x" * MAX_SCHEMA_BYTES}), ErrorCode.MESSAGE_TOO_LARGE,
                              f"{GET}.schema"),
    "registration over the limit": (
        registration({"kv": {f"a{i}": {"schema": big_schema(str(i))} for i in range(MAX_REGISTRATION_BYTES // MAX_SCHEMA_BYTES + 1)}}),
        ErrorCode.MESSAGE_TOO_LARGE, "payload"),
    "too many actions": (many_services(MAX_ACTIONS + 1), ErrorCode.MESSAGE_TOO_LARGE, "services"),
    "read_only not a boolean": (with_spec(read_only="yes"), ErrorCode.VALIDATION_FAILED, f"{GET}.read_only"),
    "destructive not a boolean": (with_spec(destructive=1), ErrorCode.VALIDATION_FAILED, f"{GET}.destructive"),
    "open_world not a boolean": (with_spec(open_world=[]), ErrorCode.VALIDATION_FAILED, f"{GET}.open_world"),
    "read-only and destructive": (with_spec(read_only=True, destructive=True), ErrorCode.VALIDATION_FAILED,
                                  f"{GET}.destructive"),
    "result schema not a map": (with_spec(result_schema=[]), ErrorCode.VALIDATION_FAILED, f"{GET}.result_schema"),
    "result schema with a bad type": (with_spec(result_schema={"type": 12}), ErrorCode.VALIDATION_FAILED,
                                      f"{GET}.result_schema.type"),
    "result schema over the limit": (with_spec(result_schema={"description": "x" * MAX_SCHEMA_BYTES}),
                                     ErrorCode.MESSAGE_TOO_LARGE, f"{GET}.result_schema"),
}


def answer(broker: Broker, payload: Any, peer: Peer | None = None) -> Any:
    """The broker's answer to `mesh.register` with `payload` from NODE_A."""
    extra = {} if peer is None else {"peer": peer}
    side, ident, out = only(broker.node_message(NODE_A, node_system("register", payload, id="r1"), 1.0, **extra))
    assert (side, ident, out[0]) == (Side.NODE, NODE_A, b"")
    assert header_of(out).correlation_id == "r1"
    return out


@pytest.mark.parametrize(("payload", "code", "field"), [pytest.param(*v, id=k) for k, v in REFUSED.items()])
def test_each_refused_registration_is_answered_with_its_code_and_field(payload: Any, code: ErrorCode, field: str) -> None:
    """Invariant: a registration the mesh cannot keep is answered (code, field) and changes nothing."""
    broker = Broker(BrokerConfig(max_message_bytes=4 * MAX_MESSAGE_BYTES))
    register(broker, NODE_B, {"echo": ["say"]})
    err = error_of(answer(broker, payload))
    assert (err.code, err.details["field"]) == (code, field), err.message
    if code == ErrorCode.MESSAGE_TOO_LARGE:
        assert isinstance(err.details["limit"], int) and err.details["limit"] > 0
    assert NODE_A not in broker.registry.nodes
    assert broker.registry.describe().keys() == {"echo"}
    assert broker.counters[f"error_{int(code)}"] == 1


def test_a_refused_reregistration_keeps_the_registered_schema() -> None:
    """Invariant: a node whose new registration is refused keeps the one it had."""
    broker = Broker()
    ok = {"type": "object"}
    assert header_of(answer(broker, with_schema(ok))).type is MessageType.RESPONSE
    assert error_of(answer(broker, with_schema({"$ref": "#"}))).code == ErrorCode.VALIDATION_FAILED
    assert broker.registry.describe()["kv"]["actions"]["get"]["schema"] == ok


def test_an_accepted_schema_is_kept_unchanged() -> None:
    """Invariant: checking a schema never alters it (no defaults filled in, refs kept)."""
    schema = {"type": "object", "properties": {"a": {"$ref": "#/definitions/name"}, "$ref": {"type": "string"}},
              "definitions": {"name": {"type": "string", "default": "x"}}, "enum": [{"$ref": "#"}]}
    broker = Broker()
    assert header_of(answer(broker, with_schema(copy.deepcopy(schema)))).type is MessageType.RESPONSE
    assert broker.registry.describe()["kv"]["actions"]["get"]["schema"] == schema


def test_a_peer_key_is_quoted_short_in_the_error() -> None:
    """Invariant: an error's field never echoes a peer's long key (headers have a size limit)."""
    out = answer(Broker(), with_services({"k" * 100_000: {"actions": {"a": {}}}}))
    err = error_of(out)
    assert err.code == ErrorCode.VALIDATION_FAILED and len(err.details["field"]) < 80
    assert len(out[1]) < 1024


def test_non_string_service_keys_are_answered_by_a_secure_broker() -> None:
    """Invariant: with security on, non-string service keys are refused VALIDATION_FAILED, nothing raises."""
    policy = parse_policy({"nodes": {"kv": {"services": ["kv"]}}})
    gate = Gate(GateSettings(), TokenVerifier(TokenSettings("HS256", "mesh", "mesh"), b"k" * 32), policy)
    broker = Broker(security=BrokerSecurity(gate))
    payload = with_services({"kv": {"actions": {"get": {}}}, 1: {"actions": {"a": {}}}})
    err = error_of(answer(broker, payload, Peer("kv")))
    assert (err.code, err.details["field"]) == (ErrorCode.VALIDATION_FAILED, "services.1")


# ------------------------------------------------------------------- pages


def big_registry(nodes: int, actions: int) -> Broker:
    """A broker whose nodes each register `actions` actions of nearly MAX_SCHEMA_BYTES."""
    broker = Broker()
    for n in range(nodes):
        payload = registration({f"svc{n}": {f"a{i}": {"schema": big_schema(f"{n}.{i}")} for i in range(actions)}})
        out = broker.node_message(b"node-%d" % n, node_system("register", payload), 1.0)
        assert header_of(out[0][2]).type is MessageType.RESPONSE
    return broker


def read_pages(broker: Broker, request: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    """Every page of `mesh.services`, merged, and the encoded size of each answer."""
    merged: dict[str, Any] = {}
    sizes: list[int] = []
    request = {**request, "after": None}
    while True:
        _, _, out = only(broker.client_message(CLIENT, command_frames("mesh", "services", payload=request), 2.0))
        assert header_of(out).type is MessageType.RESPONSE, header_of(out).error
        sizes.append(sum(map(len, out)))
        page = payload_of(out)
        assert set(page) <= {"services", "next", "ack"}
        if "ack" in page:  # a large answer: acknowledged by the next request, as the SDK does
            request["ack"] = page["ack"]
        for svc, entry in page["services"].items():
            merged.setdefault(svc, {"nodes": entry["nodes"], "actions": {}})["actions"].update(entry["actions"])
        if page["next"] is None:
            return merged, sizes
        request["after"] = page["next"]


def test_pages_cover_a_registry_larger_than_a_message_and_each_fits_half() -> None:
    """Invariant: whatever is registered, every page fits half a message and the pages add up to the registry."""
    broker = big_registry(nodes=6, actions=7)  # about 2.7 MB of schemas, as in the report
    total = len(encode_payload(broker.registry.describe()))
    assert total > 2 * MAX_MESSAGE_BYTES
    merged, sizes = read_pages(broker, {})
    assert merged == broker.registry.describe()
    assert max(sizes) <= MAX_MESSAGE_BYTES // 2 and len(sizes) >= total // (MAX_MESSAGE_BYTES // 2)


def test_the_whole_registry_is_refused_too_large_when_it_does_not_fit_one_answer() -> None:
    """Invariant: an unpaged `mesh.services` is the old map when small, MESSAGE_TOO_LARGE (with the limit) when not."""
    broker = big_registry(nodes=3, actions=7)
    h, _ = system(broker, CLIENT, "services")
    assert h.type is MessageType.ERROR and h.error is not None
    assert h.error.code == ErrorCode.MESSAGE_TOO_LARGE and h.error.details["limit"] == MAX_MESSAGE_BYTES // 2


def test_a_page_limit_counts_actions_and_a_small_registry_is_one_page() -> None:
    """Invariant: `limit` caps a page's actions; pages meet without gap or overlap."""
    broker = Broker()
    register(broker, NODE_A, {"kv": ["get", "put", "list"], "echo": ["say"]})
    h, page = system(broker, CLIENT, "services", {"after": None, "limit": 3})
    assert [(s, sorted(e["actions"])) for s, e in page["services"].items()] == [("echo", ["say"]), ("kv", ["get", "list"])]
    assert page["next"] == "kv.list"
    _, rest = system(broker, CLIENT, "services", {"after": "kv.list", "limit": 3})
    assert rest == {"services": {"kv": {"nodes": 1, "actions": {"put": broker.registry.describe()["kv"]["actions"]["put"]}}},
                    "next": None}
    _, whole = system(broker, CLIENT, "services", {"after": None})
    assert whole == {"services": broker.registry.describe(), "next": None}


@pytest.mark.parametrize(("request_", "field"), [
    ({"after": 5}, "after"), ({"after": "kv"}, "after"), ({"after": "k v.get"}, "after"),
    ({"limit": 0}, "limit"), ({"limit": True}, "limit"), ({"after": None, "limit": 10_000}, "limit"),
], ids=repr)
def test_a_bad_page_request_names_the_field(request_: dict[str, Any], field: str) -> None:
    """Invariant: a malformed page request is answered VALIDATION_FAILED naming `after` or `limit`."""
    h, _ = system(Broker(), CLIENT, "services", request_)
    assert h.error is not None and (h.error.code, h.error.details["field"]) == (ErrorCode.VALIDATION_FAILED, field)


# --------------------------------------------------------------- the node SDK


@pytest.mark.parametrize(("schema", "error"), [
    ({"type": 12}, ConfigurationError),
    ({"$ref": "#"}, ConfigurationError),
    ({"$ref": "http://127.0.0.1:9/x"}, ConfigurationError),
    ({"description": "x" * MAX_SCHEMA_BYTES}, MessageTooLargeError),
], ids=["type 12", "cycle", "remote", "large"])
def test_the_node_refuses_a_schema_when_the_action_is_declared(schema: dict[str, Any], error: type) -> None:
    """Invariant: what the broker refuses, `Node.action` refuses at once, naming the schema's field."""
    node = Node("n")
    with pytest.raises(error) as info:
        node.action("kv", "get", schema=schema)(lambda p: p)
    assert info.value.details["field"].startswith(f"{GET}.schema")
    assert node.actions == {}


def test_the_node_refuses_the_action_that_makes_its_registration_too_large() -> None:
    """Invariant: a node never builds a registration the broker would refuse for its size."""
    node = Node("n")
    count = 0
    with pytest.raises(MessageTooLargeError) as info:
        for count in range(MAX_ACTIONS):
            node.action("kv", f"a{count}", schema=big_schema(str(count)))(lambda p: p)
    assert info.value.details["limit"] == MAX_REGISTRATION_BYTES
    assert len(node.actions) == count
    assert len(encode_payload(node.registration())) <= MAX_REGISTRATION_BYTES


def test_the_node_refuses_a_description_the_broker_would_refuse() -> None:
    """Invariant: a docstring longer than the registry allows is refused at declaration."""
    with pytest.raises(ValidationFailedError):
        Node("n").action("kv", "get", description="d" * 4097)(lambda p: p)


def test_the_meta_schema_is_json_schema_draft_07() -> None:
    """Invariant: our copy of the meta-schema says what json-schema.org's draft-07 says (ids and defaults aside)."""
    jsonschema = pytest.importorskip("jsonschema")

    def stripped(value: Any, names: bool = False) -> Any:
        """Without the keywords $id, $schema and default (`names`: a map of property names)."""
        if isinstance(value, dict):
            return {k: stripped(v, k == "properties" and not names) for k, v in value.items()
                    if names or k not in ("$id", "$schema", "default")}
        return [stripped(v) for v in value] if isinstance(value, list) else value

    published = stripped(jsonschema.Draft7Validator.META_SCHEMA)
    # The published copy says "nonNegativeInteger, default 0" as allOf [ref, {default: 0}].
    published["definitions"]["nonNegativeIntegerDefault0"]["allOf"].remove({})
    assert published == DRAFT_07
