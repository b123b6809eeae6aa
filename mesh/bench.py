"""`mesh bench`: throughput and latency of the mesh, as a ratio of a raw pyzmq baseline.

Rules of this module:

* Both runs use the same shape on the same machine in the same invocation: one broker
  process, one echo worker process, `clients` client processes each keeping `inflight`
  commands outstanding, over loopback TCP (or ipc).
* The baseline is the least a ZeroMQ broker can do: a ROUTER-ROUTER loop that forwards
  frames without decoding them, to one raw DEALER worker that echoes, driven by raw DEALER
  clients. The mesh run uses the real broker, the real echo node and the AsyncClient.
* Processes are spawned (never forked) so no ZeroMQ context crosses a fork; every
  process is joined, or killed when it does not exit in time.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Final

import zmq

from .process import tune_for_serving

__all__ = ["BenchSettings", "run_bench", "format_report"]

WARMUP_S: Final = 1.0
STARTUP_S: Final = 30.0  # for a process to be ready on a loaded machine
SAMPLE_LIMIT: Final = 100_000


@dataclass(frozen=True, slots=True)
class BenchSettings:
    clients: int = 4
    inflight: int = 32
    payload: int = 256
    duration: float = 5.0
    transport: str = "tcp"


def _endpoint(transport: str, tmp: str, name: str) -> str:
    return f"ipc://{tmp}/{name}" if transport == "ipc" else "tcp://127.0.0.1:*"


def _stop(stop: Any, procs: list[Any]) -> None:
    """Tell every process to stop; kill those that have not exited in time."""
    stop.set()
    for p in procs:
        p.join(timeout=15)
        if p.is_alive():
            p.kill()
            p.join()


def _machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version()}


def _ratio(mesh: float, raw: float) -> float:
    return mesh / raw if raw else float("nan")


# ------------------------------------------------------------------ baseline


def _raw_broker(front_ep: str, back_ep: str, ready: Any, stop: Any) -> None:
    ctx = zmq.Context()
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    for s in (front, back):
        s.sndhwm = s.rcvhwm = 100_000
        s.linger = 0
    front.bind(front_ep)
    back.bind(back_ep)
    ready.put((front.last_endpoint.decode(), back.last_endpoint.decode()))
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    worker: bytes | None = None
    while not stop.is_set():
        events = dict(poller.poll(100))
        if back in events:
            for _ in range(256):
                try:
                    frames = back.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if len(frames) == 2:  # the worker's hello
                    worker = frames[0]
                else:
                    front.send_multipart(frames[1:])
        if front in events and worker is not None:
            for _ in range(256):
                try:
                    frames = front.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                back.send_multipart([worker, *frames])
    ctx.destroy(linger=0)


def _raw_worker(back_ep: str, capacity: int, stop: Any) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(back_ep)
    sock.send(b"hello")
    while not stop.is_set():
        if not sock.poll(100):
            continue
        for _ in range(256):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            sock.send_multipart(frames)
    ctx.destroy(linger=0)


def _raw_client(front_ep: str, s: BenchSettings, start: float, results: Any) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(front_ep)
    body = b"x" * s.payload
    sent: dict[bytes, float] = {}
    seq = 0
    latencies: list[float] = []
    count = 0
    measure_from, end = start + WARMUP_S, start + WARMUP_S + s.duration
    for _ in range(s.inflight):
        key = seq.to_bytes(8, "little")
        seq += 1
        sent[key] = time.perf_counter()
        sock.send_multipart([key, body])
    while True:
        now = time.time()
        if now >= end:
            break
        if not sock.poll(100):
            continue
        key, _ = sock.recv_multipart()
        t = time.perf_counter()
        if now >= measure_from:
            count += 1
            if len(latencies) < SAMPLE_LIMIT:
                latencies.append(t - sent.pop(key))
        else:
            sent.pop(key)
        key = seq.to_bytes(8, "little")
        seq += 1
        sent[key] = time.perf_counter()
        sock.send_multipart([key, body])
    results.put((count, latencies))
    ctx.destroy(linger=0)


# ---------------------------------------------------------------------- mesh


def _mesh_broker(
    clients_ep: str, nodes_ep: str, ready: Any, stop: Any, events_ep: str = "tcp://127.0.0.1:*"
) -> None:
    import threading

    from .broker.loop import BrokerServer, Endpoints

    server = BrokerServer(Endpoints(clients_ep, nodes_ep, events_ep))
    tune_for_serving()  # as `mesh broker` does
    ready.put((server.endpoints.clients, server.endpoints.nodes))
    threading.Thread(target=lambda: (stop.wait(), server.stop()), daemon=True).start()
    server.run()


def _mesh_node(nodes_ep: str, capacity: int, stop: Any, creds: Any = None) -> None:
    import threading

    from .plugins import load_node

    node = load_node("echo")
    tune_for_serving()  # as `mesh node` does
    # As many slots as commands in flight, as the raw worker has: the window is the same.
    node.capacity = capacity
    threading.Thread(target=lambda: (stop.wait(), node.stop()), daemon=True).start()
    node.run(nodes_ep, credentials=creds)


def _mesh_client(
    clients_ep: str, s: BenchSettings, start: float, results: Any, creds: Any = None, target: tuple[str, str] = ("echo", "echo")
) -> None:
    from .client import AsyncClient

    service, action = target

    async def main() -> tuple[int, list[float]]:
        payload = {"data": "x" * s.payload}
        latencies: list[float] = []
        count = 0
        measure_from, end = start + WARMUP_S, start + WARMUP_S + s.duration
        async with AsyncClient(clients_ep, timeout=30.0, credentials=creds) as client:

            async def worker() -> None:
                nonlocal count
                while time.time() < end:
                    t0 = time.perf_counter()
                    await client.call(service, action, payload)
                    t1 = time.perf_counter()
                    if time.time() >= measure_from and time.time() < end:
                        count += 1
                        if len(latencies) < SAMPLE_LIMIT:
                            latencies.append(t1 - t0)

            await asyncio.gather(*(worker() for _ in range(s.inflight)))
        return count, latencies

    results.put(asyncio.run(main()))


def _wait_for_echo(clients_ep: str, timeout: float = STARTUP_S, creds: Any = None, service: str = "echo") -> None:
    from .client import Client
    from .protocol import MeshError

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


RAW: Final = Run(_raw_broker, _raw_worker, _raw_client, serving=lambda front: time.sleep(0.3))
MESH: Final = Run(_mesh_broker, _mesh_node, _mesh_client, serving=_wait_for_echo)


def measure(run: Run, s: BenchSettings) -> dict[str, Any]:
    """Start `run`'s processes, drive load for `s.duration` after a warm-up, and return figures.

    Clients are stopped first, then the worker and the broker they use; a process that
    does not exit in time is killed.
    """
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    procs: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as tmp:
        front, back = _endpoint(s.transport, tmp, "clients"), _endpoint(s.transport, tmp, "nodes")
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
            _stop(stop, procs)


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
    import threading

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
        _stop(stop, clients)
        if watcher is not None:
            watcher.join(timeout=15)
    return _figures(sum(n for n, _ in outcomes), [x for _, sample in outcomes for x in sample], s.duration)


def _figures(count: int, latencies: list[float], duration: float) -> dict[str, Any]:
    """Throughput and latency percentiles (ms) of one run."""
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
    }


def run_bench(settings: BenchSettings) -> dict[str, Any]:
    """Run the baseline, then the mesh, with the same settings; return the report."""
    raw = measure(RAW, settings)
    mesh = measure(MESH, settings)
    return {
        "settings": asdict(settings),
        "machine": _machine(),
        "raw": raw,
        "mesh": mesh,
        "ratio": _ratio(mesh["throughput"], raw["throughput"]),
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as a few lines for people."""
    s = report["settings"]
    lines = [
        f"{s['clients']} clients x {s['inflight']} in flight, {s['payload']}-byte payloads, "
        f"{s['transport']}, {s['duration']:.0f}s per run, {report['machine']['cpus']} CPUs",
    ]
    for kind in ("raw", "mesh"):
        r = report[kind]
        lat = r["latency_ms"]
        label = "raw pyzmq loop" if kind == "raw" else "mesh"
        lines.append(
            f"{label:>15}: {r['throughput']:>9,.0f} commands/s   "
            f"p50 {lat['p50']:.2f} ms  p95 {lat['p95']:.2f} ms  p99 {lat['p99']:.2f} ms"
        )
    lines.append(f"{'ratio':>15}: {report['ratio']:.2f} of the raw loop")
    return "\n".join(lines)
