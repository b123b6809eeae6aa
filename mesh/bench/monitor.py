"""`mesh bench --monitor`: what the monitor and an open dashboard cost the broker, as a ratio.

Rules of this module:

* Every run has the command benchmark's shape (`common.measure`): one broker process,
  one echo node and `clients` AsyncClient processes keeping `inflight` commands
  outstanding. Only the broker differs: monitor off, or monitor on with a watcher in
  this process that does what an open dashboard page does (GET /snapshot every second)
  and what a Prometheus server does, at a harsher rate (GET /metrics every second).
* Runs alternate off, on, off, on, ... so that a noisy minute on a shared machine falls
  on both sides; the ratio is the "on" runs' throughput over the "off" runs', all from
  this one invocation, and each round's own ratio is shown beside it.
* A watcher request that fails is counted and reported: a cost figure measured while
  the dashboard saw errors would not be the cost of a working dashboard.
"""

from __future__ import annotations

import functools
import threading
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any, Final

from ..process import tune_for_serving
from ..testing import free_ports
from .common import MESH, BenchSettings, Run, machine, measure, ratio, stop_when_set

__all__ = ["format_monitor_report", "run_monitor_bench"]

POLL_S: Final = 1.0  # the dashboard page's poll period
PATHS: Final = ("/snapshot", "/metrics")


@dataclass
class _Watcher:
    """Polls the monitor as an open dashboard and a scraper do; counts what it got."""

    base: str
    requests: int = 0
    failures: int = 0

    def __call__(self, stop: Any) -> None:
        while True:
            for path in PATHS:
                self.requests += 1
                try:
                    with urllib.request.urlopen(self.base + path, timeout=5) as response:
                        response.read()
                except OSError:
                    self.failures += 1
            if stop.wait(POLL_S):
                return


def _broker(clients_ep: str, nodes_ep: str, ready: Any, stop: Any, monitor: str) -> None:
    from ..broker.loop import BrokerServer, Endpoints
    from ..monitor.server import monitor_settings

    server = BrokerServer(Endpoints(clients_ep, nodes_ep), monitor=monitor_settings(monitor))
    tune_for_serving()  # as `mesh broker` does
    ready.put((server.endpoints.clients, server.endpoints.nodes))
    threading.Thread(target=stop_when_set, args=(stop, server.stop), daemon=True).start()
    server.run()


def _watched(address: str) -> tuple[Run, _Watcher]:
    """The monitored run on `address` (HOST:PORT) and the watcher it drives."""
    watcher = _Watcher(f"http://{address}")
    run = Run(_broker, MESH.worker, MESH.client, serving=MESH.serving, broker_args=(address,), during=watcher)
    return run, watcher


def run_monitor_bench(settings: BenchSettings, rounds: int = 3) -> dict[str, Any]:
    """Alternate `rounds` runs with the monitor off and on; return the report."""
    off: list[dict[str, Any]] = []
    on: list[dict[str, Any]] = []
    requests = failures = 0
    for _ in range(rounds):
        off.append(measure(MESH, settings))
        run, watcher = _watched(f"127.0.0.1:{free_ports()[0]}")
        on.append(measure(run, settings))
        requests, failures = requests + watcher.requests, failures + watcher.failures
    total = functools.partial(sum, start=0.0)
    return {
        "settings": asdict(settings),
        "machine": machine(),
        "rounds": [{"off": a, "on": b, "ratio": ratio(b["throughput"], a["throughput"])} for a, b in zip(off, on, strict=True)],
        "off": total(r["throughput"] for r in off) / rounds,
        "on": total(r["throughput"] for r in on) / rounds,
        "ratio": ratio(total(r["throughput"] for r in on), total(r["throughput"] for r in off)),
        "watcher": {"requests": requests, "failures": failures, "paths": list(PATHS), "period_s": POLL_S},
    }


def format_monitor_report(report: dict[str, Any]) -> str:
    """The report as a few lines for people: each round, then the ratio over all rounds."""
    s, w = report["settings"], report["watcher"]
    row = "{:>8} {:>16} {:>16} {:>7}"
    lines = [
        f"monitor: {s['clients']} clients x {s['inflight']} in flight, {s['payload']}-byte payloads, "
        f"{s['transport']}, {s['duration']:g}s per run, {report['machine']['cpus']} CPUs",
        f"monitor on: GET {' and '.join(w['paths'])} every {w['period_s']:g} s "
        f"({w['requests']} requests, {w['failures']} failed)",
        row.format("round", "off commands/s", "on commands/s", "ratio"),
    ]
    for i, r in enumerate(report["rounds"], 1):
        lines.append(row.format(i, f"{r['off']['throughput']:,.0f}", f"{r['on']['throughput']:,.0f}", f"{r['ratio']:.3f}"))
    lines.append(row.format("all", f"{report['off']:,.0f}", f"{report['on']:,.0f}", f"{report['ratio']:.3f}"))
    return "\n".join(lines)
