"""`mesh bench --events`: events delivered per second, as a ratio of a raw pyzmq PUB/SUB chain.

The events benchmark (`run_events_bench`) has one shape for both runs, per subscriber
count N: one publisher process, one middle process, and N subscriptions spread over
`min(N, processes)` subscriber processes (so that 100 fit on a small machine), each
process reading its share round-robin. Figures are taken over the same window after a
warm-up in every process: events delivered per second (all subscribers together) and
events published per second.

* Raw: a PUB publisher, an XSUB->XPUB forwarder and SUB subscribers in plain pyzmq that
  drain in batches and decode nothing. The publisher cannot run away: the PUB and the
  forwarder's XPUB set XPUB_NODROP, so a full queue (the mesh's own bound, 10,000 events
  per subscriber and socket) makes the forwarder wait, then the publisher; the chain
  loses nothing and runs at the pace of its slowest subscriber.
* Mesh: an AsyncClient keeping `window` publishes in flight (it waits for each ack, so
  it is paced by the broker), the real BrokerServer, and AsyncClient subscriptions read
  with `get()`. The broker never waits for a subscriber (its rule, not the benchmark's):
  one that falls behind misses events, counted from the gaps it sees (`missed`).
* NATS (`--peer nats`, `mesh/bench/nats.py`): nats-server in the middle process's place,
  nats-py publisher and subscribers in the same processes as the raw chain's; a
  subscription that falls behind has events dropped, counted from the gaps (`missed`).
* `delivery` is delivered / (published x N) over the window. Below 1 with nothing
  missed, the subscribers were behind: events were still queued for them when the
  window closed (the queues hold seconds of events at these rates).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Final

import zmq

from ..protocol.topics import subscription_filter, topic_frame
from ..sockets import bound_endpoint
from ..subscription import DEFAULT_HWM
from .common import STARTUP_S, WARMUP_S, endpoint, machine, mesh_broker, ratio, stop_all

__all__ = ["EventBenchSettings", "run_events_bench", "format_events_report"]

BATCH: Final = 256  # messages a loop handles before it looks at the clock or other sockets
POLL_S: Final = 0.1  # longest wait before a loop looks at the clock again
TOPIC: Final = "bench.events"


@dataclass(frozen=True, slots=True)
class EventBenchSettings:
    """What `run_events_bench` runs; each field is described in the module rules."""

    subscribers: tuple[int, ...] = (1, 10, 100)  # one pair of runs per count
    payload: int = 256
    duration: float = 5.0
    window: int = 256  # publishes in flight in the mesh publisher
    processes: int = 4  # most subscriber processes
    transport: str = "tcp"


def _window(go: Any, start: Any, duration: float) -> tuple[float, float]:
    """Wait for the driver's go; return the measured window (after the warm-up), wall clock."""
    if not go.wait(STARTUP_S):
        raise RuntimeError("the benchmark did not start in time")
    return start.value + WARMUP_S, start.value + WARMUP_S + duration


def _spread(subscribers: int, processes: int) -> list[int]:
    """Subscriptions per subscriber process: as even as they go, in at most `processes`."""
    n = min(subscribers, processes)
    return [subscribers // n + (i < subscribers % n) for i in range(n)]


def _raw_forwarder(front_ep: str, back_ep: str, ready: Any, stop: Any) -> None:
    ctx = zmq.Context()
    front, back = ctx.socket(zmq.XSUB), ctx.socket(zmq.XPUB)
    front.linger = back.linger = 0
    front.rcvhwm = back.sndhwm = DEFAULT_HWM
    back.setsockopt(zmq.XPUB_NODROP, 1)  # a full subscriber makes sends wait (see the module rules)
    back.sndtimeo = int(POLL_S * 1000)
    front.bind(front_ep)
    back.bind(back_ep)
    ready.put((bound_endpoint(front), bound_endpoint(back)))
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    while not stop.is_set():
        events = dict(poller.poll(int(POLL_S * 1000)))
        if back in events:  # subscriptions, passed up to the publisher
            for _ in range(BATCH):
                try:
                    frame = back.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                front.send(frame)
        if front in events:
            for _ in range(BATCH):
                try:
                    frames = front.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                while not stop.is_set():
                    try:
                        back.send_multipart(frames)
                        break
                    except zmq.Again:
                        continue
    ctx.destroy(linger=0)


def _raw_publisher(front_ep: str, s: EventBenchSettings, ready: Any, go: Any, start: Any, results: Any) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUB)
    sock.linger = 0
    sock.sndhwm = DEFAULT_HWM
    sock.setsockopt(zmq.XPUB_NODROP, 1)
    sock.sndtimeo = int(POLL_S * 1000)
    sock.connect(front_ep)
    ready.put("publisher")
    measure_from, end = _window(go, start, s.duration)
    topic, body = topic_frame(TOPIC), b"x" * s.payload
    seq = published = 0
    while time.time() < end:
        sent = 0
        try:
            for _ in range(BATCH):
                sock.send_multipart([topic, seq.to_bytes(8, "little"), body])
                seq += 1
                sent += 1
        except zmq.Again:
            pass  # the forwarder is holding back: look at the clock, then try again
        if measure_from <= time.time() < end:
            published += sent
    results.put({"published": published})
    ctx.destroy(linger=0)


def _raw_subscribers(
    back_ep: str, count: int, s: EventBenchSettings, ready: Any, go: Any, start: Any, results: Any
) -> None:
    ctx = zmq.Context()
    poller = zmq.Poller()
    for _ in range(count):
        sock = ctx.socket(zmq.SUB)
        sock.linger = 0
        sock.rcvhwm = DEFAULT_HWM
        sock.setsockopt(zmq.SUBSCRIBE, subscription_filter(TOPIC))
        sock.connect(back_ep)
        poller.register(sock, zmq.POLLIN)
    ready.put("subscribers")
    measure_from, end = _window(go, start, s.duration)
    delivered = 0
    while time.time() < end:
        got = 0
        for sock, _ in poller.poll(int(POLL_S * 1000)):
            for _ in range(BATCH):
                try:
                    sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                got += 1
        if measure_from <= time.time() < end:
            delivered += got
    results.put({"delivered": delivered})  # what it missed, a raw subscriber cannot tell
    ctx.destroy(linger=0)


def _mesh_publisher(clients_ep: str, s: EventBenchSettings, ready: Any, go: Any, start: Any, results: Any) -> None:
    from ..client import AsyncClient

    async def main() -> int:
        payload = {"data": "x" * s.payload}
        published = 0
        async with AsyncClient(clients_ep, timeout=30.0) as client:
            await client.call("mesh", "ping")
            ready.put("publisher")
            measure_from, end = await asyncio.to_thread(_window, go, start, s.duration)

            async def worker() -> None:
                nonlocal published
                while time.time() < end:
                    await client.publish(TOPIC, payload)
                    if measure_from <= time.time() < end:
                        published += 1

            await asyncio.gather(*(worker() for _ in range(s.window)))
        return published

    results.put({"published": asyncio.run(main())})


def _mesh_subscribers(
    clients_ep: str, count: int, s: EventBenchSettings, ready: Any, go: Any, start: Any, results: Any
) -> None:
    from ..client import AsyncClient
    from ..subscription import AsyncSubscription, Gap

    async def main() -> dict[str, int]:
        totals = {"delivered": 0, "missed": 0}
        async with AsyncClient(clients_ep, timeout=30.0) as client:
            subs = [await client.subscribe(TOPIC) for _ in range(count)]
            ready.put("subscribers")
            measure_from, end = await asyncio.to_thread(_window, go, start, s.duration)

            async def read(sub: AsyncSubscription) -> None:
                while time.time() < end:
                    got = missed = 0
                    for _ in range(BATCH):
                        item = await sub.get(POLL_S)
                        if item is None:
                            break
                        if isinstance(item, Gap):
                            missed += item.count
                        else:
                            got += 1
                    if measure_from <= time.time() < end:
                        totals["delivered"] += got
                        totals["missed"] += missed
                    # get() does not yield while its socket has messages: let the others read.
                    await asyncio.sleep(0)

            await asyncio.gather(*(read(sub) for sub in subs))
        return totals

    results.put(asyncio.run(main()))


def _measure_events(kind: str, subscribers: int, s: EventBenchSettings) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    ready, results, stop, go = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Event()
    start = ctx.RawValue("d", 0.0)  # set once, before `go`
    procs: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as tmp:
        front, back = endpoint(s.transport, tmp, "publishers"), endpoint(s.transport, tmp, "subscribers")
        pub_fn: Callable[..., None]  # the raw and mesh publishers take the same arguments
        sub_fn: Callable[..., None]
        try:
            if kind == "raw":
                middle = ctx.Process(target=_raw_forwarder, args=(front, back, ready, stop), daemon=True)
                pub_fn, sub_fn = _raw_publisher, _raw_subscribers
            elif kind == "nats":
                from . import nats

                middle = ctx.Process(target=nats.server, args=(front, back, ready, stop), daemon=True)
                pub_fn, sub_fn = nats.publisher, nats.subscribers
            else:
                nodes = endpoint(s.transport, tmp, "nodes")
                middle = ctx.Process(target=mesh_broker, args=(front, nodes, ready, stop, back), daemon=True)
                pub_fn, sub_fn = _mesh_publisher, _mesh_subscribers
            procs.append(middle)
            middle.start()
            front, back = ready.get(timeout=STARTUP_S)
            sub_ep = front if kind == "mesh" else back  # mesh subscribers ask the broker (mesh.ping)
            procs += [
                ctx.Process(target=sub_fn, args=(sub_ep, n, s, ready, go, start, results), daemon=True)
                for n in _spread(subscribers, s.processes)
            ]
            procs.append(ctx.Process(target=pub_fn, args=(front, s, ready, go, start, results), daemon=True))
            for p in procs[1:]:
                p.start()
            for _ in procs[1:]:
                ready.get(timeout=STARTUP_S)
            start.value = time.time() + 0.1
            go.set()
            outcomes = [results.get(timeout=WARMUP_S + s.duration + 60) for _ in procs[1:]]
        finally:
            stop_all(stop, procs)
    published = sum(o.get("published", 0) for o in outcomes)
    delivered = sum(o.get("delivered", 0) for o in outcomes)
    return {
        "published": published,
        "publish_rate": published / s.duration,
        "delivered": delivered,
        "delivered_rate": delivered / s.duration,
        "delivery": ratio(delivered, published * subscribers),
        "missed": None if kind == "raw" else sum(o.get("missed", 0) for o in outcomes),
    }


def run_events_bench(settings: EventBenchSettings, peer: str | None = None) -> dict[str, Any]:
    """For each subscriber count, run the raw chain, then the `peer` if asked, then the mesh.

    Args:
        settings: the shape, the same for every run.
        peer: `nats` (`mesh/bench/nats.py`) or None.

    Returns:
        The report; with a peer, each run also has its figures and `ratio_<peer>`, and
        `machine` the peer's versions.

    Raises:
        ValueError: an unknown peer (before anything runs).
    """
    if peer not in (None, "nats"):
        raise ValueError(f"no such peer: {peer!r}")
    runs = []
    for n in settings.subscribers:
        raw = _measure_events("raw", n, settings)
        other = _measure_events(peer, n, settings) if peer else None
        mesh = _measure_events("mesh", n, settings)
        run: dict[str, Any] = {
            "subscribers": n,
            "processes": len(_spread(n, settings.processes)),
            "raw": raw,
            "mesh": mesh,
            "ratio": ratio(mesh["delivered_rate"], raw["delivered_rate"]),
        }
        if peer and other is not None:
            run |= {peer: other, f"ratio_{peer}": ratio(mesh["delivered_rate"], other["delivered_rate"])}
        runs.append(run)
    report: dict[str, Any] = {"settings": asdict(settings), "machine": machine(), "runs": runs}
    if peer:
        from .nats import versions

        report["peer"] = peer
        report["machine"] |= versions()
    return report


def format_events_report(report: dict[str, Any]) -> str:
    """The events report as a small table for people, one row per subscriber count."""
    s, peer = report["settings"], report.get("peer")
    row = "{:>11} {:>5} {:>16} {:>17} {:>6} {:>12} {:>16} {:>17}"
    extra = " {:>17} {:>14} {:>12} {:>17}" if peer else ""
    lines = [
        (
            f"events: {s['payload']}-byte payloads, {s['window']} publishes in flight (mesh), "
            f"{s['transport']}, {s['duration']:g}s per run, {report['machine']['cpus']} CPUs"
        ),
        (row + extra).format(
            "subscribers", "procs", "raw delivered/s", "mesh delivered/s", "ratio",
            "mesh missed", "raw published/s", "mesh published/s",
            *((f"{peer} delivered/s", f"ratio to {peer}", f"{peer} missed", f"{peer} published/s") if peer else ()),
        ),
    ]
    for r in report["runs"]:
        raw, mesh = r["raw"], r["mesh"]
        cells = [
            r["subscribers"], r["processes"], f"{raw['delivered_rate']:,.0f}",
            f"{mesh['delivered_rate']:,.0f}", f"{r['ratio']:.2f}", f"{mesh['missed']:,}",
            f"{raw['publish_rate']:,.0f}", f"{mesh['publish_rate']:,.0f}",
        ]
        if peer:
            other = r[peer]
            cells += [
                f"{other['delivered_rate']:,.0f}", f"{r[f'ratio_{peer}']:.2f}", f"{other['missed']:,}",
                f"{other['publish_rate']:,.0f}",
            ]
        lines.append((row + extra).format(*cells))
    return "\n".join(lines)
