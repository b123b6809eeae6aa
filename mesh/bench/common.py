"""What every benchmark shares: settings, the mesh's processes, the runner and the figures.

Rules of this module:

* Every benchmark in `mesh.bench` measures the mesh against a floor in the same
  invocation, on the same machine, with the same shape: one broker process, one worker
  process, `clients` client processes each keeping `inflight` commands outstanding, over
  loopback TCP (or ipc).
* The mesh processes are the real ones: the real broker (`BrokerServer`), the real echo
  node and the `AsyncClient`, each tuned as `mesh broker` / `mesh node` tune themselves.
* Processes are spawned (never forked) so no ZeroMQ context crosses a fork; every
  process is joined, or killed when it does not exit in time.
"""

from __future__ import annotations

import asyncio
import bisect
import multiprocessing as mp
import os
import resource
import statistics
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import zmq

from ..process import tune_for_serving

__all__ = [
    "HISTOGRAM_MS",
    "MESH",
    "SAMPLE_LIMIT",
    "STARTUP_S",
    "WARMUP_S",
    "BenchSettings",
    "Run",
    "endpoint",
    "figures",
    "histogram",
    "keep_in_flight",
    "load",
    "machine",
    "measure",
    "mesh_broker",
    "mesh_client",
    "mesh_node",
    "ratio",
    "stop_all",
    "stop_when_set",
    "wait_for_service",
    "cpu_over",
    "cpu_s",
    "raise_fd_limit",
    "rss_mb",
]

WARMUP_S: Final = 1.0
STARTUP_S: Final = 30.0  # for a process to be ready on a loaded machine
SET_S: Final = 5.0  # the longest `set_event` waits for the processes waiting on an event
SAMPLE_LIMIT: Final = 100_000
# Upper bounds (ms) of the latency histogram's buckets: log-spaced, a factor of about 1.4
# (the square root of 2) apart, from 0.25 ms to 256 ms; slower latencies fall in a last, open bucket.
HISTOGRAM_MS: Final = tuple(round(0.25 * 2 ** (k / 2), 3) for k in range(21))
_PAGE: Final = os.sysconf("SC_PAGE_SIZE")
_TICKS: Final = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class BenchSettings:
    """The shape of a command benchmark: client processes, commands each keeps in flight,
    payload bytes, seconds measured per run and `tcp` or `ipc`."""

    clients: int = 4
    inflight: int = 32
    payload: int = 256
    duration: float = 5.0
    transport: str = "tcp"


def endpoint(transport: str, tmp: str, name: str) -> str:
    """Where a process binds: `ipc://` in the run's temporary directory, or a free loopback port."""
    return f"ipc://{tmp}/{name}" if transport == "ipc" else "tcp://127.0.0.1:*"


def set_event(event: Any) -> None:
    """Set a multiprocessing Event, waiting at most `SET_S` seconds.

    `Event.set` waits until every process that was waiting on it has woken, and one that
    died while waiting never does: Ctrl-C reaches the whole process group, so a spawned
    child may die inside `stop.wait()`, and a plain `set` would then hang the benchmark
    forever instead of letting it kill what is left.
    """
    setter = threading.Thread(target=event.set, daemon=True)
    setter.start()
    setter.join(SET_S)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def cpu_over(pid: int, procs: list[Any], seconds: float) -> tuple[float, float]:
    """The cores used by process `pid` and by `procs` together over the next `seconds`."""
    cpu0, others0, t0 = cpu_s(pid), sum(cpu_s(p.pid) for p in procs), time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    return (cpu_s(pid) - cpu0) / elapsed, (sum(cpu_s(p.pid) for p in procs) - others0) / elapsed


def rss_mb(pid: int) -> float:
    """The resident memory of process `pid`, in MB."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE / 2**20


def raise_fd_limit() -> None:
    """Each connection holds descriptors: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def stop_all(stop: Any, procs: list[Any]) -> None:
    """Tell every process to stop; kill those that have not exited in time."""
    set_event(stop)
    for p in procs:
        p.join(timeout=15)
        if p.is_alive():
            p.kill()
            p.join()


def stop_when_set(event: Any, stop: Callable[[], None]) -> None:
    """Wait for `event` (the parent's stop), then call `stop`: a watcher thread's target in a spawned server."""
    event.wait()
    stop()


def machine() -> dict[str, Any]:
    """What the figures depend on besides the settings: CPUs and the ZeroMQ versions."""
    return {"cpus": os.cpu_count(), "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version()}


def ratio(mesh: float, raw: float) -> float:
    """`mesh / raw`, NaN when the floor measured nothing."""
    return mesh / raw if raw else float("nan")


# ---------------------------------------------------------------------- mesh


def mesh_broker(
    clients_ep: str, nodes_ep: str, ready: Any, stop: Any, events_ep: str = "tcp://127.0.0.1:*"
) -> None:
    """The real broker, security off (a spawned process): puts its endpoints on `ready`, serves until `stop`."""

    from ..broker.loop import BrokerServer, Endpoints

    server = BrokerServer(Endpoints(clients_ep, nodes_ep, events_ep))
    tune_for_serving()  # as `mesh broker` does
    ready.put((server.endpoints.clients, server.endpoints.nodes))
    threading.Thread(target=stop_when_set, args=(stop, server.stop), daemon=True).start()
    server.run()


def mesh_node(nodes_ep: str, capacity: int, stop: Any, creds: Any = None) -> None:
    """The real echo node with `capacity` slots (a spawned process), until `stop`."""

    from ..plugins import load_node

    node = load_node("echo")
    tune_for_serving()  # as `mesh node` does
    # As many slots as commands in flight, as the raw worker has: the window is the same.
    node.capacity = capacity
    threading.Thread(target=stop_when_set, args=(stop, node.stop), daemon=True).start()
    node.run(nodes_ep, credentials=creds)


def mesh_client(
    clients_ep: str, s: BenchSettings, start: float, results: Any, creds: Any = None, target: tuple[str, str] = ("echo", "echo")
) -> None:
    """An AsyncClient keeping `s.inflight` calls of `target` outstanding (a spawned process).

    Puts `(count, latencies)` of the measured window on `results`.
    """
    from ..client import AsyncClient

    service, action = target

    async def main() -> tuple[int, list[float]]:
        payload = {"data": "x" * s.payload}
        async with AsyncClient(clients_ep, timeout=30.0, credentials=creds) as client:
            return await keep_in_flight(lambda: client.call(service, action, payload), s, start)

    results.put(asyncio.run(main()))


async def keep_in_flight(call: Callable[[], Awaitable[Any]], s: BenchSettings, start: float) -> tuple[int, list[float]]:
    """Keep `s.inflight` awaits of `call()` outstanding until the window ends; the one accounting of every client.

    Args:
        call: makes one request and returns once it is answered.
        s: the shape and the measured duration.
        start: wall-clock time the run began; the window is `WARMUP_S` later.

    Returns:
        The calls answered inside the window and their latencies (at most `SAMPLE_LIMIT`).
    """
    latencies: list[float] = []
    count = 0
    measure_from, end = start + WARMUP_S, start + WARMUP_S + s.duration

    async def worker() -> None:
        nonlocal count
        while time.time() < end:
            t0 = time.perf_counter()
            await call()
            t1 = time.perf_counter()
            if time.time() >= measure_from and time.time() < end:
                count += 1
                if len(latencies) < SAMPLE_LIMIT:
                    latencies.append(t1 - t0)

    await asyncio.gather(*(worker() for _ in range(s.inflight)))
    return count, latencies


def wait_for_service(clients_ep: str, timeout: float = STARTUP_S, creds: Any = None, service: str = "echo") -> None:
    """Return once the broker at `clients_ep` lists `service`.

    Raises:
        RuntimeError: no node registered `service` within `timeout` seconds.
    """
    from ..client import Client
    from ..protocol import MeshError

    with Client(clients_ep, timeout=2.0, retries=0, credentials=creds) as client:
        end = time.time() + timeout
        while time.time() < end:
            try:
                if service in client.call("mesh", "services"):
                    return
            except MeshError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"the {service} node did not register in time")


# ------------------------------------------------------------------- driver


@dataclass(frozen=True, slots=True)
class Run:
    """The processes of one measured run, each a spawned function with its extra arguments.

    `broker(front, back, ready, stop, *args)` binds and puts its endpoints on `ready`;
    `worker(back, capacity, stop, *args)` serves; `client(front, settings, start, results,
    *args)` puts `(count, latencies)` on `results`. `serving(front)` returns once the
    worker is ready; `during(stop)` runs in a thread of this process while clients run.
    """

    broker: Callable[..., None]
    worker: Callable[..., None]
    client: Callable[..., None]
    serving: Callable[[str], None]
    broker_args: tuple[Any, ...] = ()
    worker_args: tuple[Any, ...] = ()
    client_args: tuple[Any, ...] = ()
    during: Callable[[Any], None] | None = None


MESH: Final = Run(mesh_broker, mesh_node, mesh_client, serving=wait_for_service)


def measure(run: Run, s: BenchSettings) -> dict[str, Any]:
    """Start `run`'s processes, drive load for `s.duration` after a warm-up, and return figures.

    Clients are stopped first, then the worker and the broker they use; a process that
    does not exit in time is killed.
    """
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    procs: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as tmp:
        front, back = endpoint(s.transport, tmp, "clients"), endpoint(s.transport, tmp, "nodes")
        try:
            broker = ctx.Process(target=run.broker, args=(front, back, ready, stop, *run.broker_args), daemon=True)
            procs.append(broker)
            broker.start()
            front, back = ready.get(timeout=STARTUP_S)
            capacity = s.clients * s.inflight
            worker = ctx.Process(target=run.worker, args=(back, capacity, stop, *run.worker_args), daemon=True)
            procs.append(worker)
            worker.start()
            run.serving(front)
            return load(run.client, front, s, run.client_args, run.during)
        finally:
            stop_all(stop, procs)


def load(
    client: Callable[..., None],
    front: str,
    s: BenchSettings,
    client_args: tuple[Any, ...] = (),
    during: Callable[[Any], None] | None = None,
    start: float | None = None,
) -> dict[str, Any]:
    """Drive `s.clients` processes of `client` (see `Run`) against a serving broker's `front`.

    Every client begins at `start` (default: in 0.5 s), counts what is answered from
    `start + WARMUP_S` for `s.duration` seconds, and is stopped (killed if it does not
    exit in time) before this returns the figures.
    """

    ctx = mp.get_context("spawn")
    results, stop = ctx.Queue(), ctx.Event()
    start = time.time() + 0.5 if start is None else start
    clients: list[Any] = []  # the started ones, to stop
    watcher: threading.Thread | None = None
    try:
        for _ in range(s.clients):
            c = ctx.Process(target=client, args=(front, s, start, results, *client_args), daemon=True)
            c.start()
            clients.append(c)
        if during is not None:
            watcher = threading.Thread(target=during, args=(stop,), daemon=True)
            watcher.start()
        outcomes = [results.get(timeout=WARMUP_S + s.duration + 60) for _ in clients]
    finally:
        stop_all(stop, clients)
        if watcher is not None:
            watcher.join(timeout=15)
    return figures(sum(n for n, _ in outcomes), [x for _, sample in outcomes for x in sample], s.duration)


def histogram(latencies: list[float]) -> list[int]:
    """How many of `latencies` (seconds, sorted) fall in each bucket of `HISTOGRAM_MS`, then above the last.

    A latency equal to a bucket's bound counts in that bucket. The counts add up to
    `len(latencies)`, so the tail is read as the share of the last buckets.
    """
    counts, start = [], 0
    for bound in HISTOGRAM_MS:
        end = bisect.bisect_right(latencies, bound / 1000, lo=start)
        counts.append(end - start)
        start = end
    counts.append(len(latencies) - start)
    return counts


def figures(count: int, latencies: list[float], duration: float) -> dict[str, Any]:
    """Throughput, latency percentiles (ms) and the latency histogram (`histogram`) of one run."""
    lat = sorted(latencies)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")

    return {
        "commands": count,
        "throughput": count / duration,
        "latency_ms": {
            "p50": pct(0.50),
            "p95": pct(0.95),
            "p99": pct(0.99),
            "mean": statistics.fmean(lat) * 1000 if lat else float("nan"),
        },
        "histogram": {"bounds_ms": list(HISTOGRAM_MS), "counts": histogram(lat)},
    }
