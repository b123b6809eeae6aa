"""`mesh bench --failover`: how fast the mesh notices a lost node under load, and recovers.

Rules of this module:

* Everything runs as real processes started the way users start them (`mesh broker`,
  `mesh node mesh.bench.failover:bench_node`, through `mesh.testing`): spawned, never
  forked, on loopback TCP. The driver is one `Client` shared by `callers` threads that
  keep calling for the whole run, and a subscription to the broker's `mesh.node` events.
* A round: wait until `nodes` nodes are registered, wait a random moment, send SIGKILL
  or SIGSTOP to one node at random, then measure
  - **detection**: signal -> the broker's `mesh.node.down` for that node (the event's
    own timestamp, taken by the broker; same machine, same wall clock);
  - **first recovery**: signal -> the first call the lost node held that is settled
    (answered by another node after re-dispatch, or failed `node lost`);
  - **full recovery**: signal -> the last call started before the down event is
    answered (nobody is left waiting on the lost node after that);
  - the broker's own counts of the round (`mesh.stats` deltas): commands re-dispatched
    and commands answered NODE_LOST.
  A call "held by the lost node" is one that overlapped the signal and took longer than
  `HELD_S` (the load's calls take `work_s`, a few tens of ms), or failed NODE_LOST.
  After a SIGSTOP round the node is continued and the time until it registers again is
  the **rejoin** time; after a SIGKILL round a fresh node replaces it.
* Load: `plain_share` of the calls are a plain (non-idempotent) action, the rest an
  idempotent one; both sleep `work_s` on the node, so the victim always holds some.
* Percentiles are nearest-rank over the rounds (with 8 rounds, p99 is the worst).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from ..client import Client
from ..node import Node
from ..protocol import ErrorCode, MeshError
from ..subscription import Event
from ..testing import MeshProcess, run_broker

__all__ = ["SIGNALS", "FailoverSettings", "run_failover_bench", "format_failover_report", "bench_node"]

HELD_S: Final = 0.25  # a call this slow across the signal was held by the lost node (normal: tens of ms)
SETTLE_S: Final = 10.0  # longest wait for the calls of a round to be answered
READY_S: Final = 20.0  # for a node to register on a loaded machine
SERVICE: Final = "failover"
SIGNALS: Final = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}


def bench_node(name: str = "n", capacity: int = 8, heartbeat_interval: float = 1.0) -> Node:
    """The node the benchmark runs: `failover.idem` (idempotent) and `failover.plain`.

    Both sleep `{"sleep": s}` on the node's loop and answer with the node's name.
    """
    n = Node(name, capacity=capacity, heartbeat_interval=heartbeat_interval)

    @n.action(SERVICE, "idem", idempotent=True, description="Sleep, then name the node (safe to run again).")
    async def idem(payload: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(float(payload.get("sleep", 0)))
        return {"node": name}

    @n.action(SERVICE, "plain", description="Sleep, then name the node (not safe to run again).")
    async def plain(payload: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(float(payload.get("sleep", 0)))
        return {"node": name}

    return n


@dataclass(frozen=True, slots=True)
class FailoverSettings:
    """What `run_failover_bench` runs; see the module rules."""

    nodes: int = 3
    rounds: int = 8  # per signal
    signals: tuple[str, ...] = ("kill", "stop")
    heartbeat_interval: float = 1.0
    callers: int = 8
    work_s: float = 0.02
    plain_share: float = 0.25
    seed: int | None = None


@dataclass(slots=True)
class Round:
    """The figures of one round (seconds; None when it did not happen)."""

    signal: str
    victim: str
    detection: float | None = None
    reason: str | None = None
    first_recovery: float | None = None
    full_recovery: float | None = None
    held: int = 0
    redispatched: int = 0
    node_lost: int = 0
    other_errors: int = 0
    rejoin: float | None = None


@dataclass(slots=True)
class _Call:
    started: float
    ended: float
    outcome: str  # the node that answered, or the error code's name


@dataclass(slots=True)
class _Watch:
    """The `mesh.node` events, collected by a thread: (received at, event)."""

    events: list[tuple[float, Event]] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def wait(self, predicate: Callable[[Event], bool], since: float, timeout: float) -> Event | None:
        deadline = time.time() + timeout
        with self.changed:
            while True:
                for at, ev in self.events:
                    if at >= since and predicate(ev):
                        return ev
                left = deadline - time.time()
                if left <= 0:
                    return None
                self.changed.wait(left)


def _percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


class _Bench:
    def __init__(self, settings: FailoverSettings) -> None:
        self.s = settings
        self.rng = random.Random(settings.seed)
        self.calls: list[_Call] = []
        self.running: dict[int, float] = {}  # caller thread -> when its current call started
        self.stop_load = threading.Event()
        self.watch = _Watch()
        self.nodes: dict[str, MeshProcess] = {}
        self.counter = 0
        self.stack = ExitStack()

    # ------------------------------------------------------------ processes

    def start_node(self) -> str:
        self.counter += 1
        name = f"n{self.counter}"
        config = {"name": name, "heartbeat_interval": self.s.heartbeat_interval}
        args = ["node", "mesh.bench.failover:bench_node", "--broker", self.broker.nodes]
        proc = MeshProcess([*args, "--config", json.dumps(config), "--log-level", "warning"])
        self.nodes[name] = proc
        return name

    def _stop_load(self, threads: list[threading.Thread]) -> None:
        self.stop_load.set()
        for t in threads:
            t.join(SETTLE_S + 1)

    def stop_all(self) -> None:
        for proc in self.nodes.values():
            proc.signal(signal.SIGCONT)  # a stopped process would not act on SIGTERM
        for proc in self.nodes.values():
            proc.stop(grace=5)

    def wait_up(self, name: str, since: float) -> Event | None:
        return self.watch.wait(lambda ev: ev.topic == "mesh.node.up" and ev.payload.get("node") == name, since, READY_S)

    # ---------------------------------------------------------------- load

    def _collect(self, sub: Any) -> None:
        while not self.stop_load.is_set():
            item = sub.get(timeout=0.2)
            if isinstance(item, Event):
                with self.watch.changed:
                    self.watch.events.append((time.time(), item))
                    self.watch.changed.notify_all()

    def _caller(self, seed: int) -> None:
        rng = random.Random(seed)
        payload = {"sleep": self.s.work_s}
        me = threading.get_ident()
        while not self.stop_load.is_set():
            action = "plain" if rng.random() < self.s.plain_share else "idem"
            started = self.running[me] = time.time()
            try:
                outcome = self.client.call(SERVICE, action, payload, timeout=SETTLE_S)["node"]
            except MeshError as err:
                outcome = err.code.name if isinstance(err.code, ErrorCode) else str(err.code)
            self.calls.append(_Call(started, time.time(), outcome))
            del self.running[me]

    def counters(self) -> dict[str, int]:
        return self.client.call("mesh", "stats", timeout=5)["counters"]

    # --------------------------------------------------------------- rounds

    def round(self, sig_name: str) -> Round:
        s = self.s
        victim = self.rng.choice(sorted(self.nodes))
        victim_proc = self.nodes[victim]
        before = self.counters()
        time.sleep(self.rng.uniform(0.1, 0.1 + s.heartbeat_interval))  # a random phase of its heartbeats
        signalled = time.time()
        os.kill(victim_proc.pid, SIGNALS[sig_name])
        r = Round(sig_name, victim)
        down = self.watch.wait(
            lambda ev: ev.topic == "mesh.node.down" and ev.payload.get("node") == victim,
            signalled,
            3 * s.heartbeat_interval + SETTLE_S,
        )
        seen = time.time()
        if down is not None:
            r.detection = down.timestamp - signalled
            r.reason = down.payload.get("reason")
        # Let every call started before the down event come back.
        cutoff = seen
        deadline = time.time() + SETTLE_S + 1
        while time.time() < deadline and any(t <= cutoff for t in list(self.running.values())):
            time.sleep(0.05)
        time.sleep(0.2)
        around = [c for c in list(self.calls) if c.started <= cutoff and c.ended >= signalled]
        held = [c for c in around if c.outcome == "NODE_LOST" or c.ended - c.started > HELD_S]
        r.held = len(held)
        if held:
            r.first_recovery = min(c.ended for c in held) - signalled
        if around:
            r.full_recovery = max(c.ended for c in around) - signalled
        r.other_errors = sum(1 for c in around if c.outcome not in self.nodes and c.outcome != "NODE_LOST")
        after = self.counters()
        r.redispatched = after.get("redispatched", 0) - before.get("redispatched", 0)
        lost_key = f"error_{int(ErrorCode.NODE_LOST)}"
        r.node_lost = after.get(lost_key, 0) - before.get(lost_key, 0)
        if sig_name == "stop":
            continued = time.time()
            victim_proc.signal(signal.SIGCONT)
            back = self.wait_up(victim, continued)
            r.rejoin = None if back is None else back.timestamp - continued
        else:
            del self.nodes[victim]
            victim_proc.popen.wait(5)
            since = time.time()
            fresh = self.start_node()
            if self.wait_up(fresh, since) is None:
                raise RuntimeError(f"replacement node {fresh} did not register:\n{self.nodes[fresh].output()}")
        return r

    def run(self) -> dict[str, Any]:
        s = self.s
        rounds: list[Round] = []
        began = time.time()
        # ExitStack unwinds last-in first-out: the load stops, then the nodes, the
        # subscription, the client and the broker.
        with self.stack:
            self.broker = self.stack.enter_context(run_broker("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "--log-level", "warning"))
            self.client = self.stack.enter_context(Client(self.broker.clients, timeout=SETTLE_S))
            sub = self.client.subscribe("mesh.node")
            self.stack.callback(sub.close)
            self.stack.callback(self.stop_all)
            threads = [threading.Thread(target=self._collect, args=(sub,), daemon=True)]
            self.stack.callback(self._stop_load, threads)
            threads[0].start()
            since = time.time()
            names = [self.start_node() for _ in range(s.nodes)]
            for name in names:
                if self.wait_up(name, since) is None:
                    raise RuntimeError(f"node {name} did not register:\n{self.nodes[name].output()}")
            for _ in range(s.callers):
                threads.append(threading.Thread(target=self._caller, args=(self.rng.random(),), daemon=True))
                threads[-1].start()
            load_began = time.time()
            time.sleep(1.0)  # warm up
            for sig_name in [sig for _ in range(s.rounds) for sig in s.signals]:
                rounds.append(self.round(sig_name))
            load_s = time.time() - load_began
            total_calls = len(self.calls)
        return _report(s, rounds, total_calls / load_s if load_s else 0.0, time.time() - began)


def _summary(rounds: list[Round]) -> dict[str, Any]:
    def pick(attr: str) -> list[float]:
        return [v for r in rounds if (v := getattr(r, attr)) is not None]

    out: dict[str, Any] = {"rounds": len(rounds), "detected": len(pick("detection"))}
    for attr in ("detection", "first_recovery", "full_recovery", "rejoin"):
        values = pick(attr)
        out[attr] = {"p50": _percentile(values, 50), "p99": _percentile(values, 99), "max": max(values) if values else None}
    reasons: dict[str, int] = {}
    for r in rounds:
        reasons[str(r.reason)] = reasons.get(str(r.reason), 0) + 1
    out["reasons"] = reasons
    out["held"] = sum(r.held for r in rounds)
    out["redispatched"] = sum(r.redispatched for r in rounds)
    out["node_lost"] = sum(r.node_lost for r in rounds)
    out["other_errors"] = sum(r.other_errors for r in rounds)
    return out


def _report(s: FailoverSettings, rounds: list[Round], calls_per_s: float, elapsed: float) -> dict[str, Any]:
    return {
        "settings": asdict(s),
        "liveness_s": 3 * s.heartbeat_interval,
        "calls_per_s": calls_per_s,
        "elapsed_s": elapsed,
        "summary": {sig: _summary([r for r in rounds if r.signal == sig]) for sig in s.signals},
        "rounds": [asdict(r) for r in rounds],
    }


def run_failover_bench(settings: FailoverSettings) -> dict[str, Any]:
    """Run the rounds (see the module rules); return the report as a JSON-able dict.

    Raises:
        RuntimeError: a node did not register in time.
    """
    return _Bench(settings).run()


def format_failover_report(report: dict[str, Any]) -> str:
    """The report as a small table."""
    s = report["settings"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f}"

    lines = [
        (
            f"failure detection under load: {s['nodes']} nodes, heartbeat {s['heartbeat_interval']:g} s "
            f"(liveness {report['liveness_s']:g} s), {s['callers']} callers, {report['calls_per_s']:.0f} calls/s, "
            f"{report['elapsed_s']:.0f} s in all"
        ),
        "",
        (
            f"{'signal':8} {'rounds':>6} {'detect p50':>10} {'p99':>6} {'1st recov p50':>13} {'p99':>6} "
            f"{'all recov p50':>13} {'p99':>6} {'rejoin p50':>10} {'redisp.':>7} {'lost':>5}  reasons"
        ),
    ]
    for sig, m in report["summary"].items():
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(m["reasons"].items()))
        lines.append(
            f"{'SIG' + sig.upper():8} {m['rounds']:>6} {ms(m['detection']['p50']):>10} {ms(m['detection']['p99']):>6} "
            f"{ms(m['first_recovery']['p50']):>13} {ms(m['first_recovery']['p99']):>6} "
            f"{ms(m['full_recovery']['p50']):>13} {ms(m['full_recovery']['p99']):>6} "
            f"{ms(m['rejoin']['p50']):>10} {m['redispatched']:>7} {m['node_lost']:>5}  {reasons}"
        )
    lines += [
        "",
        "times in ms from the signal. detect: to the broker's mesh.node.down; 1st recov: the first call the",
        "lost node held is answered (re-dispatched) or fails NODE_LOST; all recov: the last call started",
        "before the down event is answered; rejoin: SIGCONT to mesh.node.up; redisp./lost: broker counts.",
    ]
    return "\n".join(lines)
