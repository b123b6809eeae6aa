"""Raw pyzmq peers holding admitted keys, on every port of a real secure broker.

Each test names the rule it attacks. The attackers use no SDK: they build frames by
hand, so what they show holds for any client written in any language.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import zmq

from mesh.client import AsyncClient, Client
from mesh.protocol import AccessDeniedError, ErrorCode, new_id, unpack_header
from mesh.protocol.topics import AUTH
from mesh.security.credentials import Credentials, load_credentials
from mesh.security.state import ensure_state
from mesh.testing import BrokerProcess, run_broker, run_node

POLICY = """
[roles.admin]
allow = ["*"]
publish = ["*"]
subscribe = ["*"]

[roles.watcher]
allow = ["mesh.ping", "mesh.replay", "echo.*"]
subscribe = ["mesh.service"]

[nodes.echo]
services = ["echo"]
publish = ["echo"]
"""


class Mesh:
    def __init__(self, state: Path, broker: BrokerProcess) -> None:
        self.state = state
        self.broker = broker

    def creds(self, name: str) -> Credentials:
        return load_credentials(self.state / "credentials" / f"{name}.toml")

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.broker.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    state = tmp_path_factory.mktemp("hostile") / "state"
    state.mkdir(mode=0o700)
    (state / "policy.toml").write_text(POLICY)
    ensure_state(state, nodes={"echo": ["echo"]}, clients={"dev": ["admin"], "watch": ["watcher"]}, now=time.time())
    with run_broker("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "--state", str(state)) as b:
        with run_node("echo", b, "--credentials", str(state / "credentials/echo.toml")):
            yield Mesh(state, b)


def raw(ctx: zmq.Context, kind: int, endpoint: str, creds: Credentials) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.linger = 0
    sock.rcvtimeo = 5000
    creds.secure(sock)
    sock.connect(endpoint)
    return sock


def header(service: str, action: str, token: str | None = None, **extra: object) -> dict:
    h: dict = {"v": 1, "type": "command", "id": new_id(), "ts": time.time(), "service": service, "action": action}
    if token is not None:
        h["security"] = {"level": 1, "token": token}
    h.update(extra)
    return h


def answer(sock: zmq.Socket) -> dict:
    """The header of the next message on a DEALER (a node's has an empty envelope first)."""
    frames = sock.recv_multipart()
    return unpack_header(frames[-2])


@pytest.mark.parametrize("action", ["replay", "stats", "services", "ping"])
def test_the_node_port_serves_no_system_action_without_a_token(mesh, action):
    """Authorisation on every port: a node key alone opens on the node port only what the
    node protocol needs; mesh.replay, mesh.stats, ... are refused as on the client port."""
    ctx = zmq.Context()
    try:
        node = raw(ctx, zmq.DEALER, mesh.broker.nodes, mesh.creds("echo"))
        h = header("mesh", action)
        node.send_multipart([b"", msgpack.packb(h), msgpack.packb({"prefix": ""} if action == "replay" else None)])
        got = answer(node)
        assert got["type"] == "error" and got["correlation_id"] == h["id"]
        assert got["error"]["code"] == ErrorCode.AUTHENTICATION_FAILED
    finally:
        ctx.destroy(linger=0)


def test_a_node_publishes_only_the_topics_its_rule_lists(mesh):
    """Deny by default for node events: the echo node's key may publish under `echo`, not
    on another topic; each answer names the event."""
    ctx = zmq.Context()
    try:
        node = raw(ctx, zmq.DEALER, mesh.broker.nodes, mesh.creds("echo"))
        for topic, code in (("fz.private.payroll", ErrorCode.ACCESS_DENIED), ("echo.said", None)):
            h = {"v": 1, "type": "event", "id": new_id(), "ts": time.time(), "topic": topic}
            node.send_multipart([b"", msgpack.packb(h), msgpack.packb({"x": 1})])
            got = answer(node)
            assert got["correlation_id"] == h["id"]
            if code is None:
                assert got["type"] == "response"
            else:
                assert got["type"] == "error" and got["error"]["code"] == code
    finally:
        ctx.destroy(linger=0)


def test_an_event_naming_a_service_but_no_action_is_acknowledged(mesh):
    """Every accepted event is acknowledged once (a publisher that retries would publish it twice)."""
    ctx = zmq.Context()
    try:
        dev = mesh.creds("dev")
        client = raw(ctx, zmq.DEALER, mesh.broker.clients, dev)
        h = {"v": 1, "type": "event", "id": new_id(), "ts": time.time(), "topic": "fz.odd", "service": "echo",
             "security": {"level": 1, "token": dev.token}}
        client.send_multipart([msgpack.packb(h), msgpack.packb(None)])
        got = answer(client)
        assert got["type"] == "response" and got["correlation_id"] == h["id"]
        assert "service" not in got
    finally:
        ctx.destroy(linger=0)


def test_a_role_receives_only_the_topics_it_may_subscribe_to(mesh):
    """The events port enforces `subscribe`: a watcher (mesh.service only) is refused
    fz.private and every-topic subscriptions, through the SDK and through a raw XSUB, while
    an admin subscriber receives what was published."""

    async def scenario() -> tuple[list[str], str]:
        async with AsyncClient(mesh.broker.clients, credentials=mesh.creds("dev"), timeout=5) as admin, AsyncClient(
            mesh.broker.clients, credentials=mesh.creds("watch"), timeout=5
        ) as watcher:
            for prefix in ("fz.private", ""):
                with pytest.raises(AccessDeniedError) as info:
                    await watcher.subscribe(prefix)
                assert info.value.details["refused"][0]["code"] == ErrorCode.ACCESS_DENIED
            with pytest.raises(AccessDeniedError):
                await watcher.call("mesh", "replay", {"prefix": "fz"})
            await watcher.call("mesh", "replay", {"prefix": "mesh.service"})
            seen = await admin.subscribe("fz.private")
            # A raw subscriber with the watcher's key: its token and a refused filter.
            ctx = zmq.Context()
            try:
                sub = raw(ctx, zmq.XSUB, mesh.broker.events, mesh.creds("watch"))
                sub.send(b"\x01fz.")
                sub.send(b"\x01" + AUTH + mesh.creds("watch").token.encode())
                sub.send(b"\x01")  # every topic
                await asyncio.sleep(0.5)
                await admin.publish("fz.private.payroll", {"salary": 1})
                got = await seen.get(5)
                assert got is not None and got.topic == "fz.private.payroll"
                leaked = []
                while sub.poll(500):
                    leaked.append(sub.recv_multipart()[0].decode(errors="replace"))
            finally:
                ctx.destroy(linger=0)
            stats = await admin.call("mesh", "stats")
            return leaked, stats["security"]
        
    leaked, security = asyncio.run(scenario())
    assert leaked == []
    assert security["counters"].get("refused_2002", 0) >= 4
    assert any(r["what"].startswith("subscribe") for r in security["audit"])


def test_hostile_frames_are_answered_cheaply_and_the_victim_never_notices(mesh):
    """Bounded work per message: 2.1 MB of empty maps, 1,000-deep nesting and 16 KB keys
    on every port are refused by their codes and quote at most ~200 bytes of input, while a
    victim client calls throughout without a failure and no node is declared lost."""
    bomb = b"\xdd" + (2_100_000).to_bytes(4, "big") + b"\x80" * 2_100_000
    deep = b"\x84\xa1v" + b"\x91" * 1000 + b"\x01" + msgpack.packb({"type": "command", "id": "d1", "ts": time.time()})[1:]
    long_key = msgpack.packb({"v": 1, "type": "command", "id": "k1", "ts": time.time(), "x" * 16000: 1})
    failures: list[BaseException] = []
    calls = 0
    stop = threading.Event()

    def victim() -> None:
        nonlocal calls
        with Client(mesh.broker.clients, credentials=mesh.creds("dev"), timeout=5, retries=0) as c:
            while not stop.is_set():
                try:
                    c.call("echo", "echo", {"n": calls})
                    calls += 1
                except BaseException as exc:  # noqa: BLE001 - every failure is the finding
                    failures.append(exc)

    ctx = zmq.Context()
    thread = threading.Thread(target=victim)
    thread.start()
    try:
        dev = mesh.creds("dev")
        client = raw(ctx, zmq.DEALER, mesh.broker.clients, dev)
        node = raw(ctx, zmq.DEALER, mesh.broker.nodes, mesh.creds("watch"))  # any admitted key
        replay = header("mesh", "replay", dev.token)
        sends = [
            (client, [bomb]),
            (client, [bomb, b"\xc0"]),
            (client, [msgpack.packb(replay), bomb]),
            (client, [deep, b"\xc0"]),
            (client, [long_key, b"\xc0"]),
            (node, [bomb]),
            (node, [b"", bomb, b"\xc0"]),
            (node, [b"x", bomb, b"\xc0"]),
        ]
        for _ in range(10):
            for sock, frames in sends:
                sock.send_multipart(frames)
        answers = [answer(sock) for _ in range(10) for sock, _ in sends]
        assert all(a["type"] == "error" for a in answers)
        codes = {a["error"]["code"] for a in answers}
        assert codes <= {ErrorCode.BAD_FORMAT, ErrorCode.UNSUPPORTED_VERSION, ErrorCode.VALIDATION_FAILED,
                         ErrorCode.MESSAGE_TOO_LARGE}, codes
        assert max(len(a["error"]["message"]) + len(str(a["error"].get("details"))) for a in answers) < 600
        time.sleep(1.5)
    finally:
        stop.set()
        thread.join()
        ctx.destroy(linger=0)
    assert failures == [] and calls > 0
    with Client(mesh.broker.clients, credentials=mesh.creds("dev"), timeout=5) as c:
        counters = c.call("mesh", "stats")["counters"]
    assert counters.get("nodes_expired", 0) == 0 and counters.get("internal_errors", 0) == 0


def test_memory_grows_with_what_a_peer_sends_not_with_what_it_asks_for(mesh):
    """Bounded memory per peer: 200 filters of 100 kB (the link is cut: libzmq would keep
    them in its trie at ~35 bytes per byte) and 1,500 unread mesh.replay requests (each
    answer up to 512 kB) grow the broker by about what the peer sent, not by the gigabyte
    they used to; refused filters are told in the subscriber's sync marker."""
    ctx = zmq.Context()
    try:
        dev = mesh.creds("dev")
        with Client(mesh.broker.clients, credentials=dev, timeout=10) as c:
            for i in range(300):  # about 2.4 MB retained over 4 topics: replay pages of 512 kB
                c.publish(f"fill.t{i % 4}", {"blob": "x" * 8000, "i": i})
        before = mesh.rss_kb()
        sent = 0
        hog = raw(ctx, zmq.XSUB, mesh.broker.events, dev)
        for i in range(200):
            flt = b"\x01fill." + str(i).encode() * 25_000
            hog.send(flt)
            sent += len(flt)
        sub = raw(ctx, zmq.XSUB, mesh.broker.events, dev)
        sub.send(b"\x01fill." + b"y" * 2000)  # under the socket's cut, over a filter's length
        sub.send(b"\x01fill.t")  # not a topic prefix and a dot
        sub.send(b"\x01" + AUTH + dev.token.encode())
        sub.send(b"\x01\xffsync-0123456789abcdef0123456789abcdef")
        marker = None
        while marker is None and sub.poll(5000):
            frames = sub.recv_multipart()
            if frames[0] == b"\xffsync-0123456789abcdef0123456789abcdef":
                marker = msgpack.unpackb(frames[2])
        assert marker is not None
        assert [(r["code"], r["reason"]) for r in marker["refused"]] == [
            (ErrorCode.VALIDATION_FAILED, "filter too long"), (ErrorCode.VALIDATION_FAILED, "not a topic filter")]
        assert all(len(r["filter"]) <= 200 for r in marker["refused"])
        reader = raw(ctx, zmq.DEALER, mesh.broker.clients, dev)
        reader.setsockopt(zmq.RCVHWM, 1)
        for _ in range(1500):
            frames = [msgpack.packb(header("mesh", "replay", dev.token)), msgpack.packb({"prefix": "fill"})]
            reader.send_multipart(frames)
            sent += sum(map(len, frames))
        time.sleep(3)
        grown = (mesh.rss_kb() - before) * 1024
        assert grown < 2 * sent + 8 * 1024 * 1024, (grown, sent)  # measured: 2.7 MB for 13 MB sent
    finally:
        ctx.destroy(linger=0)
    with Client(mesh.broker.clients, credentials=dev, timeout=5) as c:
        stats = c.call("mesh", "stats")
    assert stats["counters"]["unread_answers_refused"] > 1000


def test_an_upstream_message_that_is_not_a_subscription_never_moves_a_filter_to_another_link(mesh):
    """libzmq applies a manual subscription to the link of the last message read, and
    queues other upstream messages without their link, shifting that by one: the broker
    applies nothing until its queue is empty again, so a watcher queued behind an
    admin's filter never receives what only the admin may (invariant: no leak, however
    the messages interleave)."""
    import os
    import signal

    dev, watch = mesh.creds("dev"), mesh.creds("watch")
    ctx = zmq.Context()
    try:
        leaked: list[bytes] = []
        for round_ in range(3):
            shifter = raw(ctx, zmq.XSUB, mesh.broker.events, dev)
            victim = raw(ctx, zmq.XSUB, mesh.broker.events, dev)
            thief = raw(ctx, zmq.XSUB, mesh.broker.events, watch)
            time.sleep(0.5)  # all three links up
            os.kill(mesh.broker.process.pid, signal.SIGSTOP)
            try:
                shifter.send(b"\x02not a subscription")
                for sock, creds in ((victim, dev), (thief, watch)):
                    sock.send(b"\x01secret.")
                    sock.send(b"\x01" + AUTH + creds.token.encode())
                time.sleep(0.3)
            finally:
                os.kill(mesh.broker.process.pid, signal.SIGCONT)
            time.sleep(0.5)
            with Client(mesh.broker.clients, credentials=dev, timeout=5) as c:
                c.publish("secret.payroll", {"round": round_})
            while thief.poll(500):
                leaked.append(thief.recv_multipart()[0])
            for sock in (shifter, victim, thief):
                sock.close(linger=0)
        assert leaked == []
    finally:
        ctx.destroy(linger=0)
    with Client(mesh.broker.clients, credentials=dev, timeout=5) as c:
        counters = c.call("mesh", "stats")["events"]["filters"]["counters"]
    assert counters.get("upstream_ignored", 0) >= 3
