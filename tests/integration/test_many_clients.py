"""Many clients per broker: the broker's listen queue and I/O threads are what its settings
say, and the SDK's clients in one process share one ZeroMQ context."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

from mesh.bench.common import rss_mb
from mesh.broker.loop import BrokerServer, Endpoints
from mesh.broker.secure import broker_security
from mesh.client import AsyncClient
from mesh.link.health import PeerState
from mesh.process import TRIM_S
from mesh.security.credentials import load_credentials
from mesh.security.state import ensure_state
from mesh.sockets import shared_context
from mesh.testing import free_ports, run_broker


def listen_backlog(endpoint: str) -> int:
    """The accept queue the kernel gives the socket listening at `endpoint` (`ss`'s Send-Q)."""
    port = endpoint.rsplit(":", 1)[1]
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return int(out.split()[2])


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_the_broker_listens_with_its_backlog_and_runs_its_io_threads():
    """Invariant: `--backlog` reaches the kernel's accept queue of every listening socket (not
    libzmq's 100, which overflows when thousands of clients reconnect at once), and
    `--io-threads N` runs N libzmq I/O threads, the default one."""
    with run_broker() as default, run_broker("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "--backlog", "777",
                                             "--io-threads", "3") as tuned:
        assert [listen_backlog(ep) for ep in (default.clients, default.nodes, default.events)] == [4096] * 3
        assert [listen_backlog(ep) for ep in (tuned.clients, tuned.nodes, tuned.events)] == [777] * 3
        assert threads(tuned.process.pid) - threads(default.process.pid) == 2


def live_timers() -> int:
    """Timers the running loop still holds (asyncio keeps them in its `_scheduled` heap)."""
    return sum(not handle.cancelled() for handle in asyncio.get_running_loop()._scheduled)  # type: ignore[attr-defined]


async def wait_until(condition: Callable[[], bool], limit: float = 10.0) -> None:
    """Return once `condition()` holds; fail if it does not within `limit` seconds."""
    end = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < end, "the condition never held"
        await asyncio.sleep(0.05)


def test_the_clients_of_one_process_share_one_context(tcp_broker):
    """Invariant: 500 `AsyncClient`s in one process start no thread of their own (they share
    the process's one context: two threads, where a context each made a thousand), every
    one of them is answered through it, and once idle they keep no timer (each had a
    10 Hz sweep, which kept a process of thousands of idle clients busy)."""

    async def main() -> list[object]:
        before = threads(os.getpid())
        clients = [AsyncClient(tcp_broker.clients, timeout=20.0) for _ in range(500)]
        try:
            assert threads(os.getpid()) - before <= 2  # the shared context's, if no test made it yet
            assert len({id(c._ctx) for c in clients}) == 1
            pongs = await asyncio.gather(*(c.call("mesh", "ping") for c in clients))
            # Idle, they keep no timer: the loop is left with nothing to wake up for.
            await wait_until(lambda: live_timers() == 0)
            return pongs
        finally:
            for c in clients:
                await c.close()

    pongs = asyncio.run(main())
    assert len(pongs) == 500 and all(isinstance(p, dict) and "instance" in p for p in pongs)


def test_a_forked_child_makes_its_own_shared_context(tcp_broker):
    """Invariant: a context does not survive `fork`, so a child's clients get a new one (and
    are answered through it) instead of the parent's, whose threads the child has not."""
    parent = shared_context()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report whether it got a new context and was answered
        ok = False
        try:
            child = shared_context()

            async def ping() -> object:
                async with AsyncClient(tcp_broker.clients, timeout=10.0) as c:
                    return await c.call("mesh", "ping")

            ok = child is not parent and child is shared_context() and "instance" in asyncio.run(ping())  # type: ignore[operator]
        finally:
            os.write(write, b"1" if ok else b"0")
            os._exit(0)
    os.close(write)
    said = os.read(read, 1)
    os.waitpid(pid, 0)
    assert said == b"1"
    assert shared_context() is parent


def test_a_call_that_waited_for_its_broker_is_not_refused_for_its_wait(tmp_path):
    """Invariant: a call stamped while its broker was not up yet, which waited in the client's
    socket past the broker's replay window, is answered once the broker comes up: the
    broker's REPLAY_DETECTED refusal of it (before anything ran) makes the client resend
    it freshly stamped, instead of failing a call that only waited."""
    window = 0.5  # the broker's replay window (10 s in production; `broker_security(max_skew=...)`)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    ensure_state(state, nodes={}, clients={"dev": ["admin"]}, now=time.time())
    endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    credentials = load_credentials(state / "credentials" / "dev.toml")

    async def main() -> object:
        # A heartbeat slower than the wait, so the client does not fail over (and restamp) first.
        async with AsyncClient(endpoint, credentials=credentials, timeout=20.0, heartbeat_interval=10.0) as client:
            call = asyncio.create_task(client.call("mesh", "ping"))
            await asyncio.sleep(3 * window)  # the call waits in the socket, no broker listening
            setup = broker_security(state, max_skew=window)
            server = BrokerServer(Endpoints(endpoint, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*"),
                                  security=setup.security, secure=setup.secure, zap=setup.zap)
            thread = threading.Thread(target=server.run, daemon=True)
            thread.start()
            try:
                return await call
            finally:
                server.stop()
                await asyncio.to_thread(thread.join, 10.0)

    assert "instance" in asyncio.run(main())  # type: ignore[operator]


def test_a_broker_paused_while_its_client_idled_is_found_dead_by_the_next_call():
    """Invariant: an idle client runs no timer, yet its next call watches the broker again:
    a broker frozen (SIGSTOP) while the client idled is suspect after one heartbeat interval
    and dead after `liveness` intervals of that call's wait (the documented window), not
    only when the call's own deadline runs out."""
    states: list[PeerState] = []

    async def main(broker: str, pid: int) -> None:
        async with AsyncClient(broker, timeout=30.0, heartbeat_interval=0.2, liveness=3,
                               on_state=lambda _ep, _old, new: states.append(new)) as client:
            await client.call("mesh", "ping")
            await wait_until(lambda: live_timers() == 0)  # idle now
            os.kill(pid, signal.SIGSTOP)
            try:
                call = asyncio.create_task(client.call("mesh", "ping"))
                await wait_until(lambda: PeerState.DEAD in states)  # well inside the call's 30 s
                call.cancel()
            finally:
                os.kill(pid, signal.SIGCONT)

    with run_broker() as b:
        asyncio.run(main(b.clients, b.process.pid))
    assert states[:2] == [PeerState.SUSPECT, PeerState.DEAD]


def test_the_scale_probe_reports_what_many_clients_cost():
    """Invariant: `mesh bench --scale` connects every client it was asked for (each first call
    answered, none failed), reports the broker's memory before, with and after them and a
    fresh client's latency, and with `--call-rate` has every client call the echo node (its
    own key, security on) at that rate while the broker's CPU is measured, every such call
    answered: at least rate x clients x seconds of them, none failed (broken once on
    purpose by starting one client too few per process: the count check failed; and once
    by never starting the callers: 0 answered failed the count check). With `--restart`, the
    broker is restarted under them and every client is answered again, none refused
    (broken once on purpose by skipping the call after the restart: 0 answered). Its
    floors, measured in the same run, are reported beside the broker's figures."""
    out = subprocess.run(
        [sys.executable, "-m", "mesh", "bench", "--scale", "--idle-clients", "31", "--client-processes", "2",
         "--duration", "1", "--call-rate", "10", "--restart", "--json"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    report = json.loads(out[out.index("{"):])
    assert report["settings"]["clients"] == 31 and report["settings"]["secure"] is True
    assert report["failed_first_calls"] == 0 and report["answered_first_calls"] == 31
    assert report["links_replaced"] == 0  # 31 clients never make their broker look dead
    rss = report["broker"]["rss_mb"]
    assert 0 < rss["before"] <= rss["idle"] and rss["after"] > 0
    assert report["broker"]["idle_cpu"] > 0 and 0 < report["fresh_client"]["p50_ms"] <= report["fresh_client"]["p99_ms"]
    calls = report["steady_calls"]
    assert report["settings"]["rate"] == 10 and calls["failed"] == 0
    assert calls["answered"] >= 31 * 10 * 1  # at least the measured second's worth
    assert 0 < calls["latency_ms"]["p50"] <= calls["latency_ms"]["p99"]
    restart = report["restart"]
    assert restart["answered"] == 31 and restart["failures"] == {} and restart["back_s"] > 0
    # The floor measured in the same run: a bare ROUTER with 31 answered connections.
    bare = report["bare_router"]
    assert 0 < bare["rss_mb"]["before"] < bare["rss_mb"]["connected"] and bare["kb_per_connection"] > 0
    assert report["memory_ratio"] == pytest.approx(report["broker"]["kb_per_client"] / bare["kb_per_connection"])
    # And a bare forwarder moving the same clients' frames at the same rate, through an echo.
    assert bare["busy_cpu"] > 0 and report["cpu_ratio"] == pytest.approx(report["broker"]["idle_cpu"] / bare["busy_cpu"])


def test_the_scale_probe_says_at_once_when_descriptors_are_too_few():
    """Invariant: a hard descriptor limit below one per client is said before anything
    starts, as a clear error (exit 1), not a ROUTER spinning on failed accepts until its
    deadline and a bare exit code (broken once by removing the check: the run outlived
    the 60 s timeout)."""
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, 150))

    done = subprocess.run(
        [sys.executable, "-m", "mesh", "bench", "--scale", "--idle-clients", "200", "--duration", "1"],
        capture_output=True, text=True, timeout=60, preexec_fn=low_limit,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "200 connections need about 264 file descriptors" in done.stderr and "the hard limit is 150" in done.stderr


def test_a_broker_returns_the_memory_of_clients_that_left():
    """Invariant: the memory a broker's links held goes back to the system once their clients
    leave (libzmq frees it, glibc kept it until the broker trims its heap): at least half
    of what 1,000 clients added is returned (broken once on purpose by not starting the
    trim: the broker kept all of it and this test failed)."""

    async def connect_and_leave(endpoint: str, pid: int) -> tuple[float, float, float]:
        before = rss_mb(pid)
        clients = [AsyncClient(endpoint, timeout=30.0) for _ in range(1000)]
        await asyncio.gather(*(c.call("mesh", "ping") for c in clients))
        held = rss_mb(pid)
        for c in clients:
            await c.close()
        await wait_until(lambda: rss_mb(pid) < held - (held - before) / 2, limit=3 * TRIM_S)
        return before, held, rss_mb(pid)

    with run_broker() as b:
        before, held, after = asyncio.run(connect_and_leave(b.clients, b.process.pid))
    assert held - before > 10  # the clients did cost memory: about 30 KB each
    print(f"\nbroker RSS: {before:.0f} MB, {held:.0f} MB with 1,000 clients, {after:.0f} MB after they left")
