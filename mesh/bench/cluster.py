"""`mesh bench --cluster`: exactly-once commands and committed log entries per second, beside plain commands.

Rules of this module:

* One invocation starts a three-broker cluster as real `mesh broker --member ...`
  processes (data directories in a temporary directory, each monitor on loopback) and
  one `mesh node mesh.bench.cluster:bench_node` process connected to all three, then
  waits until every broker agrees on a leader and knows the node's service.
* Three runs follow, each with the command benchmark's clients (`common.load`):
  `clients` AsyncClient processes keeping `inflight` commands outstanding.

  ==================  ==============  ===================================
  run                 action          clients connect to
  ==================  ==============  ===================================
  plain               `bench.plain`   the leader broker
  once via leader     `bench.once`    the leader broker
  once via follower   `bench.once`    a follower broker
  ==================  ==============  ===================================

  Both actions hand the payload back on the node's loop; only `bench.once` is
  `exactly_once`, so the difference between the runs is the replicated log: a claim
  committed before the node runs the command, its outcome committed before the reply.
* Committed log entries are measured, not derived from the command count: the leader's
  monitor snapshot (`/snapshot`) carries the cluster's commit index and the loop time it
  was taken at. `entries_per_s` is the commit index's rise between the first and the
  last snapshot taken inside the measured window, over their own times; `entries`
  is its rise from before the clients start to after they stop (warm-up and the last
  commands in flight included), so it is at least twice the commands counted.
* Ratios are against the plain run of the same invocation, so they stay comparable on
  a noisy machine. Each run also reports the cluster's term before and after it: a
  change means an election happened during the run.
* Every process is stopped at the end (SIGTERM, then SIGKILL: `mesh.testing`).
"""

from __future__ import annotations

import json
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from ..launcher import NODE_READY
from ..node import Node
from ..testing import free_ports, run_broker, spawn
from .common import STARTUP_S, WARMUP_S, BenchSettings, endpoint, load, machine, mesh_client, ratio, wait_for_service

__all__ = ["BROKERS", "SERVICE", "bench_node", "format_cluster_report", "run_cluster_bench"]

BROKERS: Final = ("b1", "b2", "b3")
SERVICE: Final = "bench"
LEADER_S: Final = 30.0  # for the cluster to agree on a leader on a loaded machine


def bench_node(capacity: int = 128) -> Node:
    """The node the benchmark runs: `bench.plain` and `bench.once` (exactly-once), the same work.

    Both hand the payload back on the node's loop, as the echo node does, so the only
    difference a client sees is what the cluster does for an exactly-once action.
    """
    n = Node(SERVICE, capacity=capacity)

    @n.action(SERVICE, "plain", description="Return the payload unchanged.")
    async def plain(payload: Any) -> Any:
        return payload

    @n.action(SERVICE, "once", exactly_once=True, description="Return the payload unchanged, exactly once.")
    async def once(payload: Any) -> Any:
        return payload

    return n


@dataclass(frozen=True, slots=True)
class _Broker:
    """Where a benchmark client and the sampler reach one broker of the cluster."""

    name: str
    clients: str
    monitor: str  # http://HOST:PORT


def _get(monitor: str, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(monitor + path, timeout=5) as response:
        return json.loads(response.read())


def _mark(monitor: str, after: float = 0.0) -> dict[str, Any]:
    """The first monitor snapshot taken at or after `after` (loop time): its time, commit index and term."""
    deadline = time.time() + STARTUP_S
    while True:
        snap = _get(monitor, "/snapshot")
        if snap["time"] >= after or time.time() > deadline:
            cluster = snap["cluster"]
            return {"time": snap["time"], "commit_index": cluster["commit_index"], "term": cluster["term"]}
        time.sleep(0.1)


def _leader(brokers: list[_Broker]) -> str:
    """The broker every member follows, once all agree (raises RuntimeError after LEADER_S)."""
    deadline = time.time() + LEADER_S
    seen: list[Any] = []
    while time.time() < deadline:
        try:
            seen = [_get(b.monitor, "/cluster") for b in brokers]
        except OSError:
            seen = []
        leaders = {view["leader"] for view in seen}
        if seen and len(leaders) == 1 and None not in leaders:
            (leader,) = leaders
            if any(view["role"] == "leader" for view in seen):
                return str(leader)
        time.sleep(0.1)
    raise RuntimeError(f"the cluster did not agree on a leader in {LEADER_S:g} s: {seen}")


def _settle(monitor: str, quiet_s: float = 1.0) -> None:
    """Wait until the leader's commit index holds still for `quiet_s` (at most STARTUP_S).

    The node's registration is published to every broker through the log, so entries
    may still be committing when the service is visible; the plain run must not count them.
    """
    deadline = time.time() + STARTUP_S
    last, since = None, time.time()
    while time.time() < deadline:
        index = _get(monitor, "/cluster")["commit_index"]
        if index != last:
            last, since = index, time.time()
        elif time.time() - since >= quiet_s:
            return
        time.sleep(0.1)


@dataclass
class _Window:
    """Reads the leader's first and last snapshot inside the measured window (a `Run.during`)."""

    monitor: str
    start: float  # the clients' start (`common.load`)
    duration: float
    marks: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, stop: Any) -> None:
        measure_from = self.start + WARMUP_S
        stop.wait(max(0.0, measure_from - time.time()))
        try:
            self.marks.append(_mark(self.monitor, after=measure_from))  # the first snapshot inside
            stop.wait(max(0.0, measure_from + self.duration - time.time()))  # and the last one
            self.marks.append(_mark(self.monitor))
        except OSError:
            return

    def rate(self) -> float:
        """Entries committed per second between the two snapshots (NaN without two distinct ones)."""
        if len(self.marks) < 2 or self.marks[1]["time"] <= self.marks[0]["time"]:
            return float("nan")
        first, last = self.marks
        return (last["commit_index"] - first["commit_index"]) / (last["time"] - first["time"])


def _run(name: str, label: str, via: _Broker, action: str, leader: _Broker, s: BenchSettings) -> dict[str, Any]:
    """One run of `bench.ACTION` through `via`; with the leader's commit index around it."""
    before = _mark(leader.monitor)
    start = time.time() + 0.5
    window = _Window(leader.monitor, start, s.duration)
    figures = load(mesh_client, via.clients, s, (None, (SERVICE, action)), during=window, start=start)
    after = _mark(leader.monitor, after=start + WARMUP_S + s.duration)
    row: dict[str, Any] = {"run": name, "label": label, "broker": via.name, "action": action, **figures}
    row["log"] = {
        "entries": after["commit_index"] - before["commit_index"],
        "entries_per_s": window.rate(),
        "terms": [before["term"], after["term"]],
    }
    return row


def run_cluster_bench(settings: BenchSettings) -> dict[str, Any]:
    """Start the cluster and the node, run plain, once via leader, once via follower; return the report.

    Raises:
        RuntimeError: the cluster found no leader, or the node did not register, in time.
    """
    s = settings
    with tempfile.TemporaryDirectory(prefix="mesh-bench-cluster-") as tmp, ExitStack() as stack:
        ports = free_ports(2 * len(BROKERS))
        peers = [f"--member={b}=tcp://127.0.0.1:{p}" for b, p in zip(BROKERS, ports, strict=False)]  # the first half: peers
        brokers: list[_Broker] = []
        nodes_eps: list[str] = []
        for b, port in zip(BROKERS, ports[len(BROKERS):], strict=True):
            proc = stack.enter_context(run_broker(
                endpoint(s.transport, tmp, f"{b}-clients"), endpoint(s.transport, tmp, f"{b}-nodes"),
                "--name", b, *peers, "--data", str(Path(tmp) / b), "--monitor", f"127.0.0.1:{port}",
                "--log-level", "warning", events=endpoint(s.transport, tmp, f"{b}-events"),
            ))  # fmt: skip
            brokers.append(_Broker(b, proc.clients, f"http://127.0.0.1:{port}"))
            nodes_eps.append(proc.nodes)
        node = stack.enter_context(spawn([
            "node", "mesh.bench.cluster:bench_node", "--broker", ",".join(nodes_eps),
            "--capacity", str(s.clients * s.inflight), "--log-level", "warning",
        ]))  # fmt: skip
        node.wait_for(NODE_READY.pattern, timeout=STARTUP_S)
        for broker in brokers:
            wait_for_service(broker.clients, service=SERVICE)
        by_name = {b.name: b for b in brokers}
        leader = by_name[_leader(brokers)]
        follower = next(b for b in brokers if b is not leader)
        _settle(leader.monitor)
        rows = [
            _run("plain", "plain via leader", leader, "plain", leader, s),
            _run("once_leader", "exactly_once via leader", leader, "once", leader, s),
            _run("once_follower", "exactly_once via follower", follower, "once", leader, s),
        ]
    plain = rows[0]["throughput"]
    for row in rows:
        row["ratio"] = ratio(row["throughput"], plain)
        row["log"]["per_command"] = ratio(row["log"]["entries_per_s"], row["throughput"])
    return {
        "settings": asdict(s),
        "machine": machine(),
        "cluster": {"brokers": list(BROKERS), "leader": leader.name, "follower": follower.name},
        "rows": rows,
    }


def format_cluster_report(report: dict[str, Any]) -> str:
    """The report as a small table for people, one row per run."""
    s, c = report["settings"], report["cluster"]
    row = "{:>26} {:>11} {:>8} {:>8} {:>15} {:>14} {:>10}"
    lines = [
        (
            f"cluster: {len(c['brokers'])} brokers (leader {c['leader']}, follower {c['follower']}), "
            f"{s['clients']} clients x {s['inflight']} in flight, {s['payload']}-byte payloads, "
            f"{s['transport']}, {s['duration']:g}s per run, {report['machine']['cpus']} CPUs"
        ),
        row.format("", "commands/s", "p50 ms", "p99 ms", "ratio to plain", "log entries/s", "per command"),
    ]
    for r in report["rows"]:
        lat, log = r["latency_ms"], r["log"]
        lines.append(row.format(
            r["label"], f"{r['throughput']:,.0f}", f"{lat['p50']:.2f}", f"{lat['p99']:.2f}", f"{r['ratio']:.3f}",
            f"{log['entries_per_s']:,.0f}", f"{log['per_command']:.2f}",
        ))  # fmt: skip
    terms = sorted({t for r in report["rows"] for t in r["log"]["terms"]})
    lines.append(
        f"log entries/s: the leader's commit index over the measured window; terms seen: {', '.join(map(str, terms))}"
        + (" (an election happened during the runs)" if len(terms) > 1 else "")
    )
    return "\n".join(lines)
