"""`mesh bench`: throughput and latency of the mesh, as a ratio of a raw pyzmq baseline.

Rules of this module:

* Both runs use the same shape on the same machine in the same invocation: one broker
  process, one echo worker process, `clients` client processes each keeping `inflight`
  commands outstanding, over loopback TCP (or ipc).
* The baseline is the least a ZeroMQ broker can do: a ROUTER-ROUTER loop that forwards
  frames without decoding them, to one raw DEALER worker that echoes, driven by raw DEALER
  clients. The mesh run uses the real broker, the real echo node and the AsyncClient.
* With a peer (`--peer nats`), that system runs between the two in the same shape
  (`mesh/bench/nats.py`) and the mesh is also reported as a ratio of it.
* Processes are spawned (never forked) so no ZeroMQ context crosses a fork; every
  process is joined, or killed when it does not exit in time.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Final

import zmq

from ..sockets import bound_endpoint
from .common import MESH, SAMPLE_LIMIT, WARMUP_S, BenchSettings, Run, machine, measure, ratio

__all__ = ["RAW", "run_bench", "format_report"]


# ------------------------------------------------------------------ baseline


def _raw_broker(front_ep: str, back_ep: str, ready: Any, stop: Any) -> None:
    ctx = zmq.Context()
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    for s in (front, back):
        s.sndhwm = s.rcvhwm = 100_000
        s.linger = 0
    front.bind(front_ep)
    back.bind(back_ep)
    ready.put((bound_endpoint(front), bound_endpoint(back)))
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


RAW: Final = Run(_raw_broker, _raw_worker, _raw_client, serving=lambda front: time.sleep(0.3))


def run_bench(settings: BenchSettings, peer: str | None = None) -> dict[str, Any]:
    """Run the baseline, then the `peer` if asked, then the mesh, with the same settings.

    Args:
        settings: the shape, the same for every run.
        peer: `nats` (`mesh/bench/nats.py`) or None.

    Returns:
        The report; with a peer, also its figures, `ratio_<peer>` (the mesh's throughput as
        a ratio of the peer's) and the peer's versions in `machine`.

    Raises:
        ValueError: an unknown peer (before anything runs).
    """
    if peer not in (None, "nats"):
        raise ValueError(f"no such peer: {peer!r}")
    raw = measure(RAW, settings)
    other = None
    if peer:
        from .nats import measure_nats, versions

        other = measure_nats(settings)
    mesh = measure(MESH, settings)
    report: dict[str, Any] = {
        "settings": asdict(settings),
        "machine": machine(),
        "raw": raw,
        "mesh": mesh,
        "ratio": ratio(mesh["throughput"], raw["throughput"]),
    }
    if peer and other is not None:
        report |= {"peer": peer, peer: other, f"ratio_{peer}": ratio(mesh["throughput"], other["throughput"])}
        report["machine"] |= versions()
    return report


_LABELS: Final = {"raw": "raw pyzmq loop", "nats": "NATS", "mesh": "mesh"}


def format_report(report: dict[str, Any]) -> str:
    """The report as a few lines for people."""
    s, peer = report["settings"], report.get("peer")
    lines = [
        f"{s['clients']} clients x {s['inflight']} in flight, {s['payload']}-byte payloads, "
        f"{s['transport']}, {s['duration']:.0f}s per run, {report['machine']['cpus']} CPUs",
    ]
    kinds = ("raw", peer, "mesh") if peer else ("raw", "mesh")
    for kind in kinds:
        r = report[kind]
        lat = r["latency_ms"]
        lines.append(
            f"{_LABELS[kind]:>15}: {r['throughput']:>9,.0f} commands/s   "
            f"p50 {lat['p50']:.2f} ms  p95 {lat['p95']:.2f} ms  p99 {lat['p99']:.2f} ms"
        )
    ratios = f"{report['ratio']:.2f} of the raw loop"
    if peer:
        ratios += f", {report[f'ratio_{peer}']:.2f} of {_LABELS[peer]}"
        other = report[peer]
        if other["answered"] != other["requests"]:
            ratios += f" ({_LABELS[peer]} answered {other['answered']:,} of {other['requests']:,} requests)"
    lines.append(f"{'ratio':>15}: {ratios}")
    return "\n".join(lines + _histogram_lines(report, kinds))


def _histogram_lines(report: dict[str, Any], kinds: tuple[str, ...]) -> list[str]:
    """The runs' latency histograms side by side: the share of commands per bucket, in %.

    Buckets are shown from the first to the last one any run used; `>` is the open last one.
    """
    hists = [report[kind]["histogram"] for kind in kinds]
    totals = [sum(h["counts"]) or 1 for h in hists]
    used = [i for i in range(len(hists[0]["counts"])) if any(h["counts"][i] for h in hists)]
    if not used:
        return []
    bounds = hists[0]["bounds_ms"]
    lines = ["latency histogram, % of commands per bucket:", "    up to ms" + "".join(f"{_LABELS[k]:>16}" for k in kinds)]
    for i in range(used[0], used[-1] + 1):
        label = f"{bounds[i]:>12.2f}" if i < len(bounds) else f"{'> ' + format(bounds[-1], '.0f'):>12}"
        lines.append(label + "".join(f"{100 * h['counts'][i] / t:>15.2f}%" for h, t in zip(hists, totals, strict=True)))
    return lines
