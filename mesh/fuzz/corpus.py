"""The seed corpus: valid messages of every kind, built with the codec's own encoders.

Mutations start from these, so most fuzzed messages get past the first checks and reach
the code behind them. Each function returns wire maps (decoded headers, so a mutation
can change one field) or frames; ids are drawn from the `rng`, times come in as `now`.
"""

from __future__ import annotations

import random
from typing import Any, Final

import msgpack

from ..protocol import (
    encode_cancel_header,
    encode_command_header,
    encode_event_header,
    encode_payload,
    encode_progress_header,
)
from ..protocol.message import PROTOCOL_VERSION
from ..protocol.topics import CONTROL, subscription_filter
from ..security.state import policy_text

__all__ = [
    "new_fuzz_id",
    "encode_event_header",
    "unpack_wire",
    "peek_wire",
    "encode_command",
    "client_message",
    "registration",
    "load_report",
    "node_control",
    "reply_to",
    "subscription_frames",
    "seed_policy",
    "hostile_policy",
    "TOPICS",
]

TOPICS: Final = ("orders", "orders.eu", "fuzz", "mesh.node", "sensors.t1.temp", "a" * 64)
_COMMANDS: Final = (
    ("echo", "echo", lambda rng: {"text": "hi" * rng.randrange(1, 20)}),
    ("echo", "reverse", lambda rng: {"text": "fuzz"}),
    ("kv", "get", lambda rng: {"key": f"k{rng.randrange(50)}"}),
    ("kv", "put", lambda rng: {"key": "k1", "value": rng.randbytes(16)}),
    ("kv", "list", lambda rng: {"prefix": ""}),
    ("mesh", "ping", lambda rng: None),
    ("mesh", "services", lambda rng: {"callable": rng.random() < 0.5}),
    ("mesh", "replay", lambda rng: {"prefix": rng.choice(["", "fuzz", "orders"]), "after": 0}),
    ("mesh", "stats", lambda rng: None),
    ("mesh", "renew", lambda rng: None),
    ("mesh", "register", lambda rng: registration(rng)),
    ("mesh", "revoke", lambda rng: {"jti": "x"}),
    ("nosuch", "thing", lambda rng: None),
)


def new_fuzz_id(rng: random.Random) -> str:
    """A message id drawn from `rng` (so a seed names every message of a run)."""
    return f"fz{rng.getrandbits(64):016x}"


def unpack_wire(header: bytes) -> dict[str, Any]:
    """The wire map of a header our own encoder (or a `Sealer`) made: always a map."""
    return msgpack.unpackb(header, raw=False)


def peek_wire(frame: bytes) -> dict[str, Any]:
    """The wire map of a header the broker sent, or {} when it is not a readable map."""
    try:
        wire = msgpack.unpackb(frame, raw=False)
    except Exception:  # noqa: BLE001 - msgpack raises several unrelated types for bad input
        return {}
    return wire if isinstance(wire, dict) else {}


def encode_command(service: str, action: str, id: str, now: float) -> bytes:
    """A command header with a deadline a few seconds away."""
    return encode_command_header(service, action, id=id, now=now, deadline=now + 3.0)


def client_message(rng: random.Random, now: float, id: str, earlier: str | None = None) -> tuple[dict[str, Any], bytes]:
    """A valid client message (command, event or cancel) as (wire map, payload frame).

    Args:
        rng: where every choice comes from.
        now: the message's time.
        id: its id.
        earlier: an id sent before, for a cancel to name.
    """
    pick = rng.random()
    if pick < 0.12:
        topic = rng.choice(TOPICS)
        metadata = {"k": "v"} if rng.random() < 0.3 else None
        return unpack_wire(encode_event_header(topic, id=id, now=now, metadata=metadata)), encode_payload({"n": 1})
    if pick < 0.16 and earlier is not None:
        return unpack_wire(encode_cancel_header(earlier, now=now, id=id)), b"\xc0"
    service, action, body = rng.choice(_COMMANDS)
    deadline = now + rng.choice([2.0, 4.0]) if rng.random() < 0.7 else None
    metadata = {"trace": id} if rng.random() < 0.2 else None
    header = encode_command_header(service, action, id=id, now=now, deadline=deadline, metadata=metadata)
    return unpack_wire(header), encode_payload(body(rng))


def registration(rng: random.Random, name: str = "kv", service: str = "kv") -> dict[str, Any]:
    """A node's `mesh.register` payload as `Node.registration()` writes it."""
    actions = {
        act: {"description": f"{act} a key", "schema": {"type": "object"}, "idempotent": act == "get", "exactly_once": False}
        for act in rng.sample(["get", "put", "list", "incr", "delete"], rng.randrange(1, 4))
    }
    return {
        "name": name,
        "instance": f"fz-{rng.getrandbits(32):08x}",
        "capacity": rng.choice([1, 2, 8]),
        "heartbeat_interval": 1.0,
        "services": {service: {"actions": actions}},
    }


def load_report(rng: random.Random) -> dict[str, Any]:
    """A heartbeat's load report (`registry.parse_load` fields)."""
    return {"in_flight": rng.randrange(0, 8), "capacity": 8, "queued": rng.randrange(0, 3), "latency_ms": rng.random() * 5}


def node_control(rng: random.Random, now: float, id: str, service: str = "kv") -> tuple[dict[str, Any], bytes]:
    """A node's own message (envelope b""): a mesh.* command or an event, as (wire map, payload).

    Nodes send no token; mesh.ping, mesh.stats, mesh.replay and mesh.services are here
    because an attacker holding a node key tries them too.
    """
    pick = rng.random()
    if pick < 0.15:
        return unpack_wire(encode_event_header(rng.choice(TOPICS), id=id, now=now)), encode_payload(
            {"blob": rng.randbytes(rng.choice([16, 1024, 200_000]))}
        )
    action, body = rng.choice([
        ("register", registration(rng, service=service)),
        ("heartbeat", load_report(rng)),
        ("heartbeat", load_report(rng)),
        ("ping", None),
        ("stats", None),
        ("services", {"callable": True}),
        ("replay", {"prefix": "", "after": 0}),
        ("unregister", None),
        ("renew", None),
    ])  # fmt: skip
    return unpack_wire(encode_command_header("mesh", action, id=id, now=now)), encode_payload(body)


def reply_to(rng: random.Random, command: dict[str, Any], now: float, id: str) -> tuple[dict[str, Any], bytes]:
    """A node's answer to a dispatched `command` (its wire map): a response, an error or progress."""
    pick = rng.random()
    if pick < 0.1:
        return unpack_wire(encode_progress_header(str(command.get("id", "x")), now=now, id=id)), encode_payload({"progress": 0.5})
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": "response", "id": id, "ts": now,
                              "correlation_id": command.get("id")}
    if pick < 0.3:
        header["type"] = "error"
        header["error"] = {"code": rng.choice([1002, 3000, 3006, 9999]), "message": "fuzz", "retryable": False}
    return header, encode_payload({"value": None})


def subscription_frames(rng: random.Random, limit: int) -> list[bytes]:
    """One message an events subscriber may send upstream: a (un)subscription, a sync
    request or a drop report, sometimes with a filter up to `limit` bytes long."""
    pick = rng.random()
    if pick < 0.35:
        return [b"\x01" + subscription_filter(rng.choice(("", *TOPICS)))]
    if pick < 0.5:
        return [b"\x01" + rng.choice([b"x", b"fuzz."]) * max(1, rng.randrange(limit // 2) // 5)]
    if pick < 0.6:
        return [b"\x00" + subscription_filter(rng.choice(TOPICS))]
    if pick < 0.7:
        return [b"\x01" + CONTROL + rng.randbytes(rng.choice((8, 16))).hex().encode()]  # short ones are refused
    if pick < 0.85:
        return [encode_payload({"sub": "s" * rng.randrange(1, 300), "prefix": "", "received": 1, "missed": 0})]
    return [rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.randrange(1, 3))]


def seed_policy(rng: random.Random) -> str:
    """A valid policy text, as `mesh up` generates it for a few nodes."""
    nodes = {name: [name] for name in rng.sample(["echo", "kv", "sqlite", "fs", "late"], rng.randrange(0, 4))}
    return policy_text(nodes)


_TOML_VALUES: Final = (
    "5", "true", "inf", "nan", "1979-05-27T07:32:00Z", '""', '"*"', '"mesh.renew"', '["*", 1]', "[[], {}]",
    '"10.0.0.0/33"', '["::ffff:10.0.0.0/104"]', "{ allow = [\"*\"] }", '"\\ud800"', '"a.b.c.d"',
    "[" * 1000 + "]" * 1000, "{a={a={a={a={a=1}}}}}", '"' + "x" * 70 + '.y"', "0x7fffffffffffffff" + "9",
)


def hostile_policy(rng: random.Random) -> str:
    """A policy text with one to four line-level changes: lines dropped or repeated, a
    value swapped for an odd TOML literal (deep arrays, dates, bad networks), keys renamed."""
    lines = seed_policy(rng).splitlines()
    for _ in range(rng.randrange(1, 5)):
        i = rng.randrange(len(lines))
        op = rng.randrange(6)
        if op == 0:
            del lines[i]
        elif op == 1:
            lines.insert(i, lines[i])
        elif op == 2 and "=" in lines[i]:
            lines[i] = lines[i].split("=")[0] + "= " + rng.choice(_TOML_VALUES)
        elif op == 3:
            key = rng.choice(["allow", "deny", "cidrs", "renew", "publish", "subscribe", "services", "bogus"])
            lines.insert(i, f"{key} = {rng.choice(_TOML_VALUES)}")
        elif op == 4:
            lines.insert(i, rng.choice(["[roles]", "[nodes.x.y]", "[[roles.r]]", "[roles.\"bad name\"]", "roles = 3"]))
        else:
            lines[i] = lines[i][: rng.randrange(len(lines[i]) + 1)]
        if not lines:
            lines = [""]
    return "\n".join(lines)
