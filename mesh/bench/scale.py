"""`mesh bench --scale`: what many connected clients cost one broker, idle, calling, or through its restart.

Rules of this module:

* The broker is a real `mesh broker` process (security on with `secure`: CURVE, tokens),
  with the settings under test as its flags (`--io-threads`; the backlog is its default).
* `clients` AsyncClients are spread over `processes` spawned processes (never forked),
  each one asyncio loop sharing one ZeroMQ context. Each client connects and makes one
  first call (`mesh.ping`, which the broker answers itself); the clock runs from the
  first process beginning to make its clients (after its start-up) to the last first answer.
  The links the clients replaced by then (`AsyncClient.failovers`: a link judged dead and
  opened again, here to the same and only broker) are counted.
* Then everything idles for `idle` seconds while the broker's CPU is sampled from /proc;
  with a call `rate`, every client instead calls the echo node (a real node process, its
  own key with security on) `rate` times a second, each at its own phase, from its first
  answer until the fresh client below is done, and the window measures the broker busy.
  Then a fresh client connects (its first call timed) and makes `FRESH_CALLS` sequential
  calls, timed one by one. The broker's resident memory is read before the clients (after
  one warm-up call, as the floor's), with them idle, and after they closed and their
  processes exited.
* With `restart`, the broker is then stopped and started again on the same endpoints and
  state, and every client makes one more call (`mesh.ping`, its default retries): the
  clock runs from the stop to the last answer, and each failure is counted by its code.
* The floors are measured first, in the same run (mesh/bench/bare_router.py): a bare
  libzmq ROUTER with as many connections from as many processes, and with a call rate
  the same ROUTER forwarding as many DEALERs' frames at that rate through an echo
  process; the report gives the broker's memory per client and, with a rate, its busy
  CPU as ratios of them.
* Every process is stopped at the end, killed when it does not exit in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import queue
import random
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from ..process import TRIM_S
from .bare_router import bare_router_floor
from .common import STARTUP_S, cpu_over, figures, machine, raise_fd_limit, ratio, rss_mb, set_event, stop_all

__all__ = ["ScaleSettings", "format_scale_report", "run_scale_bench"]

FRESH_CALLS: Final = 500


@dataclass(frozen=True, slots=True)
class ScaleSettings:
    """Idle clients, the processes they run in, seconds of idling measured, security, and
    the broker's I/O threads."""

    clients: int = 2000
    processes: int = 4
    idle: float = 5.0
    secure: bool = True
    io_threads: int = 1
    rate: float = 0.0  # calls per second each client makes to the echo node (0: idle)
    restart: bool = False  # restart the broker under the clients, then one call each


def _idle_clients(endpoint: str, count: int, creds_path: str | None, results: Any, stop: Any, rate: float = 0.0,
                  ended: Any = None, again: Any = None) -> None:
    """`count` AsyncClients in this spawned process: connect, one call each, idle until `stop`
    (or, with a `rate`, call `echo.echo` that often each until `ended`).

    Puts `(when it began making clients, when the last first answer came, [seconds each
    first call took], errors, links its clients replaced)` on `results`, and with a rate, at `ended`, `(answered,
    failed, [seconds each answered call took])`. With `again` (the broker restarted), once
    it is set, one call each, then `(when the last answer came, {error code: count}, answered)`.
    """
    from ..client import AsyncClient
    from ..protocol import MeshError
    from ..security.credentials import load_credentials

    raise_fd_limit()
    creds = load_credentials(creds_path) if creds_path else None

    async def first(client: AsyncClient) -> float | None:
        t0 = time.perf_counter()
        try:
            await client.call("mesh", "ping")
        except MeshError:
            return None
        return time.perf_counter() - t0

    latencies: list[float] = []
    failed = 0

    async def last_code(client: AsyncClient) -> int | None:
        try:
            await client.call("mesh", "ping")
        except MeshError as err:
            return int(err.code)
        return None

    async def steady(client: AsyncClient) -> None:
        nonlocal failed
        period = 1.0 / rate
        due = time.perf_counter() + random.uniform(0, period)
        while True:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            due += period
            t0 = time.perf_counter()
            try:
                await client.call("echo", "echo", {"n": 1})
            except MeshError:
                failed += 1
                continue
            latencies.append(time.perf_counter() - t0)

    async def main() -> None:
        began = time.time()
        clients = [AsyncClient(endpoint, timeout=60.0, credentials=creds) for _ in range(count)]
        try:
            took = await asyncio.gather(*(first(c) for c in clients))
            answered = [t for t in took if t is not None]
            replaced = sum(c.failovers for c in clients)
            results.put((began, time.time(), answered, len(took) - len(answered), replaced))
            if rate:
                callers = [asyncio.create_task(steady(c)) for c in clients]
                await asyncio.to_thread(ended.wait)
                for task in callers:
                    task.cancel()
                await asyncio.gather(*callers, return_exceptions=True)
                results.put((len(latencies), failed, latencies))
            if again is not None:
                await asyncio.to_thread(again.wait)
                codes = await asyncio.gather(*(last_code(c) for c in clients))
                results.put((time.time(), Counter(str(code) for code in codes if code is not None), codes.count(None)))
            await asyncio.to_thread(stop.wait)
        finally:
            for c in clients:
                await c.close()

    asyncio.run(main())


def _start_echo_node(ctx: Any, nodes_ep: str, stop: Any, creds_path: str | None, clients_ep: str) -> Any:
    """The echo node (with its own key when `creds_path` is set), serving once this returns."""
    from ..security.credentials import load_credentials
    from .common import mesh_node, wait_for_service

    node_creds = client_creds = None
    if creds_path:
        node_creds = load_credentials(Path(creds_path).with_name("echo.toml"))
        client_creds = load_credentials(creds_path)
    proc = ctx.Process(target=mesh_node, args=(nodes_ep, 256, stop, node_creds), daemon=True)
    proc.start()
    wait_for_service(clients_ep, timeout=STARTUP_S, creds=client_creds)
    return proc


def _restart(stack: contextlib.ExitStack, old: Any, flags: list[str], again: Any, results: Any,
             processes: int) -> tuple[int, dict[str, Any]]:
    """Stop the broker, start it again with `flags` (its endpoints and state), then let every
    client call once: the new broker's pid, and the seconds from the stop to the last
    answer with the failures by error code."""
    from ..testing.processes import spawn

    began = time.time()
    old.stop()
    new = stack.enter_context(spawn(["broker", *flags]))
    new.wait_for(r"ready clients=", timeout=STARTUP_S)
    set_event(again)
    try:
        outcomes = [results.get(timeout=120) for _ in range(processes)]
    except queue.Empty:
        raise RuntimeError("the clients were not all answered within 120 s of the broker's restart") from None
    failures = sum((codes for _, codes, _ in outcomes), Counter[str]())
    return new.pid, {"back_s": max(when for when, _, _ in outcomes) - began, "failures": dict(failures),
                     "answered": sum(n for _, _, n in outcomes)}


async def _fresh_client(endpoint: str, creds: Any, calls: int = FRESH_CALLS) -> tuple[float, list[float]]:
    """A new client's first call (connection included), then `calls` calls one at a time."""
    from ..client import AsyncClient

    t0 = time.perf_counter()
    async with AsyncClient(endpoint, timeout=30.0, credentials=creds) as client:
        await client.call("mesh", "ping")
        first = time.perf_counter() - t0
        latencies = []
        for _ in range(calls):
            t = time.perf_counter()
            await client.call("mesh", "ping")
            latencies.append(time.perf_counter() - t)
    return first, latencies


def _secure_state(tmp: Path, flags: list[str]) -> str:
    """A state directory under `tmp` for the broker (added to its `flags`); the clients' credentials file."""
    from ..security.state import ensure_state

    state = tmp / "state"
    state.mkdir(mode=0o700)
    ensure_state(state, nodes={"echo": ["echo"]}, clients={"dev": ["admin"]}, now=time.time())
    flags += ["--state", str(state)]
    return str(state / "credentials" / "dev.toml")


def run_scale_bench(s: ScaleSettings) -> dict[str, Any]:
    """Connect `s.clients` idle clients to one broker and measure what they cost it.

    Raises:
        RuntimeError: a client process did not connect its clients within a minute and a half.
    """
    from ..security.credentials import load_credentials
    from ..testing.processes import spawn

    raise_fd_limit()
    bare = bare_router_floor(s.clients, s.processes, s.secure, s.rate, s.idle)  # the floors, before the broker runs
    ctx = mp.get_context("spawn")
    results, stop, ended, again = ctx.Queue(), ctx.Event(), ctx.Event(), ctx.Event()
    procs: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="mesh-scale-") as tmp, contextlib.ExitStack() as stack:
        flags = ["--io-threads", str(s.io_threads), "--log-level", "warning"]  # the endpoints are apart
        creds_path = _secure_state(Path(tmp), flags) if s.secure else None
        anywhere = ["--clients", "tcp://127.0.0.1:*", "--nodes", "tcp://127.0.0.1:*", "--events", "tcp://127.0.0.1:*"]
        broker = stack.enter_context(spawn(["broker", *anywhere, *flags]))
        ready = broker.wait_for(r"ready clients=(\S+) nodes=(\S+) events=(\S+)", timeout=STARTUP_S)
        endpoint, nodes_ep = ready.group(1), ready.group(2)
        pid = broker.pid
        creds = load_credentials(creds_path) if creds_path else None
        asyncio.run(_fresh_client(endpoint, creds, calls=0))  # the first client's one-time cost, as the floor's
        rss_before = rss_mb(pid)
        per = [s.clients // s.processes + (i < s.clients % s.processes) for i in range(s.processes)]
        try:
            if s.rate:
                procs.append(_start_echo_node(ctx, nodes_ep, stop, creds_path, endpoint))
            for count in per:
                p = ctx.Process(target=_idle_clients, daemon=True,
                                args=(endpoint, count, creds_path, results, stop, s.rate, ended, again if s.restart else None))
                p.start()
                procs.append(p)
            try:
                outcomes = [results.get(timeout=90) for _ in per]
            except queue.Empty:
                raise RuntimeError("the clients did not all connect within 90 s") from None
            connected = max(o[1] for o in outcomes) - min(o[0] for o in outcomes)
            time.sleep(1.0)  # let the last answers settle before sampling idleness
            idle_cpu, clients_cpu = cpu_over(pid, procs, s.idle)
            rss_idle = rss_mb(pid)
            fresh_first, fresh = asyncio.run(_fresh_client(endpoint, creds))
            set_event(ended)  # the calls at `rate` end here, before any restart
            steady = [results.get(timeout=30) for _ in per] if s.rate else []
            restart = None
            if s.restart:  # on the same endpoints and state
                pinned = [*flags, "--clients", endpoint, "--nodes", nodes_ep, "--events", ready.group(3)]
                pid, restart = _restart(stack, broker, pinned, again, results, len(per))
        finally:
            stop_all(stop, procs)
        time.sleep(TRIM_S + 1.0)  # the broker returns what the closed links held
        rss_after = rss_mb(pid)
    first_calls = sorted(t for _, _, took, _, _ in outcomes for t in took)
    calls = sorted(t for _, _, took in steady for t in took)
    fresh_figures = figures(len(fresh), fresh, 1.0)["latency_ms"]
    return {
        "benchmark": "scale",
        "settings": asdict(s),
        "machine": machine(),
        "connected_s": connected,
        "answered_first_calls": len(first_calls),
        "failed_first_calls": sum(o[3] for o in outcomes),
        "links_replaced": sum(o[4] for o in outcomes),
        "first_call_ms": figures(len(first_calls), first_calls, 1.0)["latency_ms"],
        "broker": {
            "idle_cpu": idle_cpu,
            "rss_mb": {"before": rss_before, "idle": rss_idle, "after": rss_after},
            "kb_per_client": (rss_idle - rss_before) * 1024 / s.clients,
        },
        "bare_router": bare,
        "memory_ratio": ratio((rss_idle - rss_before) * 1024 / s.clients, bare["kb_per_connection"]),
        "cpu_ratio": ratio(idle_cpu, bare["busy_cpu"]) if s.rate else None,
        "clients_idle_cpu": clients_cpu,
        "steady_calls": {"answered": len(calls), "failed": sum(f for _, f, _ in steady),
                         "latency_ms": figures(len(calls), calls, 1.0)["latency_ms"] if calls else None},
        "fresh_client": {"first_call_ms": fresh_first * 1000, "p50_ms": fresh_figures["p50"],
                         "p99_ms": fresh_figures["p99"]},
        "restart": restart,
    }


def format_scale_report(report: dict[str, Any]) -> str:
    """The report as a few lines of text."""
    s, b, f, c = report["settings"], report["broker"], report["fresh_client"], report["steady_calls"]
    rss = b["rss_mb"]
    return "\n".join([
        f"{s['clients']} clients in {s['processes']} processes, security {'on' if s['secure'] else 'off'}, "
        f"broker io_threads {s['io_threads']}",
        f"connected and first call answered: {report['connected_s']:.2f} s "
        f"(first call p50 {report['first_call_ms']['p50']:.1f} ms, p99 {report['first_call_ms']['p99']:.1f} ms; "
        f"{report['failed_first_calls']} failed; {report['links_replaced']} links replaced by their clients)",
        *([f"each client calling echo.echo {s['rate']:g} times a second: {c['answered']} answered, {c['failed']} failed, "
           f"p50 {c['latency_ms']['p50']:.2f} ms, p99 {c['latency_ms']['p99']:.2f} ms"] if s["rate"] and c["latency_ms"] else []),
        f"broker {'busy' if s['rate'] else 'idle'} CPU: {100 * b['idle_cpu']:.1f} % of a core; "
        f"client processes: {100 * report['clients_idle_cpu']:.1f} %",
        f"broker RSS: {rss['before']:.0f} MB before, {rss['idle']:.0f} MB with the clients "
        f"({b['kb_per_client']:.1f} KB each), {rss['after']:.0f} MB after they left",
        f"bare libzmq ROUTER with as many connections: {report['bare_router']['kb_per_connection']:.1f} KB each; "
        f"the broker holds {report['memory_ratio']:.2f} times that per client",
        *([f"bare pyzmq forwarder, the same clients at the same rate: {100 * report['bare_router']['busy_cpu']:.1f} % "
           f"of a core; the broker used {report['cpu_ratio']:.2f} times that"] if s["rate"] else []),
        f"fresh client: first call {f['first_call_ms']:.1f} ms, then p50 {f['p50_ms']:.2f} ms, p99 {f['p99_ms']:.2f} ms",
        *([f"broker restarted: {r['answered']} clients answered again, the last {r['back_s']:.2f} s after the stop; "
           f"failures by code: {r['failures'] or 'none'}"] if (r := report["restart"]) else []),
    ])
