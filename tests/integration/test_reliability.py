"""Failures with real processes: a frozen node, a saturated link, a broker restarted mid-load.

Each test runs real `mesh broker` / `mesh node` processes on loopback and watches the
broker's own `mesh.node` events, which is how an operator would see the same thing.
(SIGKILL of a node mid-command is in test_node_loss.py.)
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from mesh.client import Client
from mesh.protocol import DeadlineExceededError, MeshError, NodeLostError
from mesh.subscription import Event
from mesh.testing import free_ports, run_broker, run_node

# The broker declares a node dead after 3 silent heartbeat intervals (1 s by default);
# it checks every 50 ms, and the node may have spoken just before it froze.
LIVENESS_S = 3.0
HANDLER_S = 3.0  # how long the commands caught by a failure run


class NodeEvents:
    """The `mesh.node.*` events of one broker, collected by a background thread."""

    def __init__(self, client: Client, from_seq: int | None = None) -> None:
        self._sub = client.subscribe("mesh.node", from_seq=from_seq)
        self.events: list[tuple[float, Event]] = []  # (monotonic time received, event)
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while not self._stop.is_set():
            item = self._sub.get(timeout=0.2)
            if isinstance(item, Event):
                with self._changed:
                    self.events.append((time.monotonic(), item))
                    self._changed.notify_all()

    def wait(self, predicate: Callable[[Event], bool], timeout: float, since: float = 0.0) -> tuple[float, Event]:
        """The first event received after `since` (monotonic) that satisfies `predicate`, and
        when it came; waits up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for at, ev in self.events:
                    if at >= since and predicate(ev):
                        return at, ev
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(ev.topic, ev.payload) for _, ev in self.events]
                    raise TimeoutError(f"no such event in {timeout} s; seen: {seen}")
                self._changed.wait(left)

    def of(self, topic: str) -> list[dict[str, Any]]:
        """The payloads of the events of `topic` received so far."""
        with self._changed:
            return [ev.payload for _, ev in self.events if ev.topic == topic]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sub.close()


@contextmanager
def node_events(client: Client, from_seq: int | None = None) -> Iterator[NodeEvents]:
    watcher = NodeEvents(client, from_seq)
    try:
        yield watcher
    finally:
        watcher.close()


def in_background(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[threading.Thread, list[Any]]:
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(fn(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test inspects
            outcome.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t, outcome


def is_node(topic: str, name: str, **fields: Any) -> Callable[[Event], bool]:
    return lambda ev: ev.topic == topic and ev.payload.get("node") == name and all(
        ev.payload.get(k) == v for k, v in fields.items()
    )



def test_a_frozen_node_is_declared_dead_then_accepted_back_after_sigcont(tcp_broker):
    """SIGSTOP: the node is declared dead (silent) within its liveness window, its
    idempotent command completes on the other node, the other is NODE_LOST; after SIGCONT
    it registers again and serves."""
    with Client(tcp_broker.clients, timeout=30) as c, node_events(c) as watch:
        with run_node("testnodes:node", tcp_broker, config=json.dumps({"name": "first", "capacity": 2})) as first:
            _, up = watch.wait(is_node("mesh.node.up", "first"), 10)
            # Both commands land on `first`, the only node so far.
            # Long enough to be still running once the second node is up (it starts in ~1 s).
            idem, idem_out = in_background(c.call, "alpha", "idem", {"sleep": HANDLER_S})
            work, work_out = in_background(c.call, "alpha", "work", {"sleep": HANDLER_S})
            time.sleep(0.3)
            with run_node("testnodes:node", tcp_broker, config=json.dumps({"name": "second", "capacity": 2})):
                watch.wait(is_node("mesh.node.up", "second"), 10)
                assert idem.is_alive() and work.is_alive(), "the commands ended before the signal"
                stopped = time.monotonic()
                first.signal(signal.SIGSTOP)
                try:
                    down_at, down = watch.wait(is_node("mesh.node.down", "first"), LIVENESS_S + 4)
                    detection = down_at - stopped
                    # First suspect (1.5 silent intervals; routing avoids it), then down.
                    suspect_at, _ = watch.wait(is_node("mesh.node.suspect", "first"), 0, since=stopped)
                    assert suspect_at < down_at
                    assert down.payload["reason"] == "silent"
                    assert down.payload["id"] == up.payload["id"]
                    # The window runs from the node's last message (its last heartbeat, up
                    # to one interval before the signal), so: between 2 and 3 s, plus slack.
                    assert LIVENESS_S - 1.2 <= detection <= LIVENESS_S + 2.0, detection
                    idem.join(10)
                    work.join(10)
                    assert idem_out == [{"node": "second"}]
                    assert len(work_out) == 1 and isinstance(work_out[0], NodeLostError), work_out
                    assert c.call("mesh", "services")["alpha"]["nodes"] == 1
                finally:
                    continued = time.monotonic()
                    first.signal(signal.SIGCONT)
                # Its next heartbeat is answered {"known": false}, so it registers again.
                back_at, _ = watch.wait(is_node("mesh.node.up", "first"), 10, since=continued)
                assert back_at - continued < 5
                print(f"frozen node: declared dead {detection:.2f} s after SIGSTOP, back {back_at - continued:.3f} s after SIGCONT")
                assert c.call("mesh", "services")["alpha"]["nodes"] == 2
                # It takes commands again: round-robin between two idle nodes reaches it.
                names = {c.call("alpha", "whoami", {})["node"] for _ in range(8)}
                assert names == {"first", "second"}
                assert c.call("alpha", "work", {"sleep": 0}) is not None


def test_a_killed_node_is_declared_dead_within_its_liveness_window(tcp_broker):
    """SIGKILL: mesh.node.down within the liveness window; the idempotent command completes
    on the other node, the plain one is answered NODE_LOST."""
    with Client(tcp_broker.clients, timeout=30) as c, node_events(c) as watch:
        with run_node("testnodes:node", tcp_broker, config=json.dumps({"name": "first", "capacity": 2})) as first:
            watch.wait(is_node("mesh.node.up", "first"), 10)
            # Long enough to be still running once the second node is up (it starts in ~1 s).
            idem, idem_out = in_background(c.call, "alpha", "idem", {"sleep": HANDLER_S})
            work, work_out = in_background(c.call, "alpha", "work", {"sleep": HANDLER_S})
            time.sleep(0.3)
            with run_node("testnodes:node", tcp_broker, config=json.dumps({"name": "second", "capacity": 2})):
                watch.wait(is_node("mesh.node.up", "second"), 10)
                assert idem.is_alive() and work.is_alive(), "the commands ended before the signal"
                killed = time.monotonic()
                first.signal(signal.SIGKILL)
                down_at, down = watch.wait(is_node("mesh.node.down", "first"), LIVENESS_S + 4)
                # A dead peer's socket is gone, but a ROUTER does not say so: the broker
                # notices the silence, or a send that fails ("unreachable").
                assert down.payload["reason"] in ("silent", "unreachable")
                assert down_at - killed <= LIVENESS_S + 2.0, down_at - killed
                idem.join(10)
                work.join(10)
                assert idem_out == [{"node": "second"}]
                assert len(work_out) == 1 and isinstance(work_out[0], NodeLostError), work_out
                print(f"killed node: declared dead ({down.payload['reason']}) {down_at - killed:.2f} s after SIGKILL")


BLOB = 900_000  # bytes per large message, close to the broker's 1 MiB limit
BULK_S = 8.0


def test_heavy_bulk_traffic_causes_no_false_dead_declaration(tcp_broker):
    """Large payloads both ways through one node for 8 s: no mesh.node.down, no failed call."""
    clients = [Client(tcp_broker.clients, timeout=20) for _ in range(4)]
    try:
        with node_events(clients[0]) as watch, run_node(
            "testnodes:node", tcp_broker, config=json.dumps({"name": "bulk", "capacity": 8})
        ):
            watch.wait(is_node("mesh.node.up", "bulk"), 10)
            failures: list[BaseException] = []
            moved = [0]
            lock = threading.Lock()
            end = time.monotonic() + BULK_S
            big = "y" * BLOB

            def download(c: Client) -> None:  # big replies: node -> broker -> client
                while time.monotonic() < end:
                    try:
                        n = len(c.call("alpha", "blob", {"size": BLOB}))
                    except MeshError as exc:
                        failures.append(exc)
                        return
                    with lock:
                        moved[0] += n

            def upload(c: Client) -> None:  # big commands: client -> broker -> node
                while time.monotonic() < end:
                    try:
                        c.call("alpha", "idem", {"sleep": 0, "pad": big})
                    except MeshError as exc:
                        failures.append(exc)
                        return
                    with lock:
                        moved[0] += BLOB

            threads = [
                threading.Thread(target=fn, args=(c,))
                for c in clients
                for fn in (download, download, upload)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(BULK_S + 25)
            assert not failures, failures[:3]
            print(f"bulk: {moved[0] / 1e6:.0f} MB in {BULK_S:.0f} s through one node")
            assert moved[0] >= 50 * BLOB  # the link was really busy (tens of MB)
            time.sleep(0.3)  # a down event would already be out; give it a moment to arrive
            assert watch.of("mesh.node.down") == []
            # Not even a doubt: every reply counts as a sign of life, big ones included.
            assert watch.of("mesh.node.suspect") == []
            assert clients[0].call("mesh", "services")["alpha"]["nodes"] == 1
    finally:
        for c in clients:
            c.close()


@contextmanager
def restartable_broker() -> Iterator[Callable[[], Any]]:
    """A broker on fixed free ports, and a function that SIGKILLs it and starts a new one
    on the same ports (returning the new one's BrokerProcess)."""
    clients_port, nodes_port, events_port = free_ports(3)
    endpoints = (f"tcp://127.0.0.1:{clients_port}", f"tcp://127.0.0.1:{nodes_port}")
    events_ep = f"tcp://127.0.0.1:{events_port}"
    with ExitStack() as stack:
        current = [stack.enter_context(run_broker(*endpoints, events=events_ep))]

        def restart() -> Any:
            current[0].process.signal(signal.SIGKILL)
            current[0].process.popen.wait(5)
            time.sleep(0.5)
            current[0] = stack.enter_context(run_broker(*endpoints, events=events_ep))
            return current[0]

        restart.first = current[0]  # type: ignore[attr-defined]
        yield restart


def test_a_broker_restarted_mid_load_gets_every_node_back_and_serves_the_same_client():
    """SIGKILL the broker while a client loops calls, start a new one on the same ports:
    both nodes register again and the same Client object (not restarted) is served again."""
    with restartable_broker() as restart:
        first = restart.first
        with Client(first.clients, timeout=3) as c, run_node(
            "testnodes:node", first, config=json.dumps({"name": "n1"})
        ), run_node("testnodes:node", first, config=json.dumps({"name": "n2"})):
            ok: list[float] = []  # monotonic times of calls answered
            failed: list[tuple[float, BaseException]] = []
            stop = threading.Event()

            def load() -> None:
                while not stop.is_set():
                    try:
                        c.call("alpha", "idem", {"sleep": 0.1})
                        ok.append(time.monotonic())
                    except MeshError as exc:
                        failed.append((time.monotonic(), exc))
                        time.sleep(0.05)

            looper = threading.Thread(target=load)
            looper.start()
            try:
                time.sleep(1.0)
                assert ok and not failed
                killed = time.monotonic()
                new = restart()
                started = time.monotonic()
                assert new.clients == first.clients
                # From seq 0: the registrations that happened before we subscribed too.
                # (A subscription does not fail over, so this one is on a new client.)
                with Client(new.clients, timeout=5) as watcher, node_events(watcher, from_seq=0) as watch:
                    for name in ("n1", "n2"):
                        watch.wait(is_node("mesh.node.up", name), 10)
                    back = time.monotonic() - started
                    assert watcher.call("mesh", "services")["alpha"]["nodes"] == 2
                # Served again: the old client's new calls reach the new broker.
                deadline = time.monotonic() + 10
                while not [t for t in ok if t > started] and time.monotonic() < deadline:
                    time.sleep(0.1)
                served = [t for t in ok if t > started]
                assert served, f"no call answered after the restart; failures: {failed[-5:]}"
                assert back < 6, back
                # At most the call in flight at the kill is lost (the next test).
                assert len(failed) <= 1 and all(t >= killed for t, _ in failed), failed
                assert all(isinstance(e, DeadlineExceededError) for _, e in failed), failed
                print(f"broker restart: nodes back {back:.2f} s after the new broker was ready; "
                      f"first call served {served[0] - killed:.2f} s after the kill; {len(failed)} call(s) lost")
            finally:
                stop.set()
                looper.join(10)


def test_the_call_in_flight_when_the_broker_dies_is_answered_by_the_restarted_broker():
    """The command a killed broker had dispatched is resent by the same Client (same id) to
    the broker restarted on the same port, and answered within the call's budget."""
    with restartable_broker() as restart:
        first = restart.first
        with Client(first.clients, timeout=10) as c, run_node(
            "testnodes:node", first, config=json.dumps({"name": "n1"})
        ):
            call, out = in_background(c.call, "alpha", "idem", {"sleep": 1.0}, timeout=8)
            time.sleep(0.3)  # on the node by now
            restart()
            call.join(12)
            if out and isinstance(out[0], BaseException):
                raise out[0]
            assert out == [{"node": "n1"}]
