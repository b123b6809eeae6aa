"""What the monitor shows, built from the broker core in one pass, without sockets or clocks.

Rules of this module:

* The broker loop owns the core. It calls `Monitor.snapshot(core, now, ...)` from its
  tick (at most every `SNAPSHOT_S`) and hands the result to the HTTP thread by one
  attribute assignment; the HTTP side only reads snapshots, never the core.
* A snapshot is a fresh tree of plain dicts, lists, strings and numbers (JSON as is),
  never changed after it is built, so readers in other threads need no lock.
* Nothing here runs per message. Latency comes from samples the loop takes at most
  every `SAMPLE_S` (`reply_latency`), rates from counter differences between snapshots.
* Everything kept is bounded: latency samples, the chart history, recent errors, the
  nodes remembered after they died, and the clients and subscribers listed.
* Names and numbers only: no payloads, tokens or keys (identities are routing ids).
"""

from __future__ import annotations

import os
import resource
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, Final

from ..link.health import PeerState, judge
from ..protocol import peek_header
from ..protocol.errors import Category, ErrorCode, category_of

__all__ = [
    "Monitor",
    "SNAPSHOT_S",
    "SAMPLE_S",
    "STATES",
    "node_state",
    "percentile",
    "process_usage",
    "reply_latency",
]

SNAPSHOT_S: Final = 0.5  # how often the loop builds a snapshot (only with the monitor on)
SAMPLE_S: Final = 0.005  # at most one latency sample per this many seconds (200/s)
HISTORY_S: Final = 1.0  # one chart point per second ...
HISTORY_POINTS: Final = 300  # ... for the last five minutes
LATENCY_SAMPLES: Final = 2048  # the reservoir behind /varz percentiles
RECENT_ERRORS: Final = 100
DEAD_KEPT_S: Final = 300.0  # a lost node stays on the page, dead, this long
DEAD_KEPT: Final = 256
LISTED: Final = 200  # clients and subscribers listed, most recently active first
PEER_SUSPECT_S: Final = 1.0  # a cluster peer not heard from this long is suspect ...
PEER_DEAD_S: Final = 3.0  # ... and dead after this long (a leader speaks every 0.1 s)
SUSPECT_FRACTION: Final = 0.5  # silent for half its liveness window: suspect
STATES: Final = tuple(state.value for state in PeerState)
_FINISHED: Final = ("completed", "failed", "timed_out", "abandoned")
_CATEGORIES: Final = tuple(c.value for c in Category)
_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """The `q` quantile (0..1) of sorted values by nearest rank, None when empty."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def reply_latency(core: Any, frames: Sequence[bytes], now: float) -> float | None:
    """Seconds since the broker received the command a node's reply answers, if it is one.

    Called by the loop on a node message *before* the core handles it (the core forgets
    the command as it answers). Costs one header peek, so the loop calls it rarely.
    """
    if len(frames) != 3 or not frames[0]:
        return None
    cid = peek_header(frames[1], "correlation_id")
    cmd = core.commands.get((frames[0], cid)) if isinstance(cid, str) else None
    return None if cmd is None else max(0.0, now - cmd.received_at)


def process_usage() -> dict[str, float]:
    """Resident memory and CPU seconds of this process (Linux /proc, else getrusage peak)."""
    times = os.times()
    try:
        with open("/proc/self/statm", "rb") as f:
            rss = int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"rss_bytes": float(rss), "cpu_user_s": times.user, "cpu_system_s": times.system}


def node_state(node: Any, now: float) -> str:
    """up, suspect or dead: the registry's `PeerState` (set by the core's tick) when the
    node has one, else judged from its silence by the shared rule (`mesh.link.health`):
    suspect past half its liveness window (1.5 heartbeat intervals), dead past all of it.
    """
    explicit = getattr(node, "state", None)
    explicit = getattr(explicit, "value", explicit)
    if explicit in STATES:
        return str(explicit)
    return judge(now - node.last_seen, node.liveness * SUSPECT_FRACTION, node.liveness).value


def _node_view(node: Any, now: float) -> dict[str, Any]:
    return {
        "id": node.identity.hex(),
        "name": node.name,
        "state": node_state(node, now),
        "capacity": node.capacity,
        "in_flight": node.in_flight,
        "load": round(node.in_flight / node.capacity, 4),
        "completed": node.completed,
        "services": sorted(node.services),
        "registered_at": node.registered_at,
        "last_seen": node.last_seen,
        "silence_s": round(max(0.0, now - node.last_seen), 3),
        "liveness_s": node.liveness,
    }


def _error_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return "UNKNOWN"


def _category(code: int) -> str:
    try:
        return category_of(code).value
    except ValueError:
        return "unknown"


class Monitor:
    """The monitor's own memory between snapshots: samples, rates, history, lost nodes.

    Lives in the broker loop's thread; `snapshot()` returns a new tree each time.
    """

    def __init__(self, name: str, started: float) -> None:
        self.name = name
        self.started = started
        self._latency: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self._fresh: list[float] = []  # samples since the last chart point
        self._history: deque[dict[str, Any]] = deque(maxlen=HISTORY_POINTS)
        self._errors: deque[dict[str, Any]] = deque(maxlen=RECENT_ERRORS)
        self._dead: dict[str, dict[str, Any]] = {}  # node id -> its last view, marked dead
        self._seen: dict[str, dict[str, Any]] = {}  # node id -> its view in the last snapshot
        self._last: tuple[float, dict[str, int], int, float] | None = None  # t, counters, out, cpu
        self._last_point: tuple[float, dict[str, int], int] | None = None
        self._rates: dict[str, float] = {"commands_per_s": 0.0, "messages_in_per_s": 0.0, "messages_out_per_s": 0.0}
        self._cpu_percent = 0.0

    def observe(self, latency_s: float) -> None:
        """One command's broker round trip (from `reply_latency`)."""
        self._latency.append(latency_s)
        if len(self._fresh) < LATENCY_SAMPLES:
            self._fresh.append(latency_s)

    def snapshot(
        self,
        core: Any,
        now: float,
        *,
        messages_out: int = 0,
        usage: Mapping[str, float] | None = None,
        cluster: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Everything the endpoints serve, as of `now`.

        Args:
            core: the `Broker` (read only, from the loop's thread).
            now: the loop's clock.
            messages_out: messages the loop has sent so far.
            usage: `process_usage()` of the broker process.
            cluster: `ClusterMember.status()` when the broker is in a cluster.
        """
        usage = dict(usage or {"rss_bytes": 0.0, "cpu_user_s": 0.0, "cpu_system_s": 0.0})
        counters = {k: int(v) for k, v in core.counters.items()}
        self._rate(now, counters, messages_out, usage["cpu_user_s"] + usage["cpu_system_s"])
        nodes = self._nodes(core, now)
        errors = self._errors_view(core, counters)
        ordered = sorted(self._latency)
        self._chart_point(now, counters, errors)
        errors["recent"] = list(self._errors)
        by_state = {"received": 0, "queued": 0, "dispatched": 0}
        for cmd in core.commands.values():
            state = cmd.state.value
            by_state[state] = by_state.get(state, 0) + 1
        latency = {f"p{q}": _ms(percentile(ordered, q / 100)) for q in (50, 95, 99)}
        varz = {
            "broker": self.name,
            "started": self.started,
            "uptime_s": round(now - self.started, 3),
            "draining": bool(core.draining),
            "messages": {"in": counters.get("messages_in", 0), "out": messages_out},
            "commands": {
                "received": counters.get("commands_received", 0),
                "in_flight": by_state,
                "finished": {k: counters.get(k, 0) for k in _FINISHED},
            },
            "throughput": dict(self._rates),
            "latency_ms": {**latency, "samples": len(ordered)},
            "memory": {"rss_bytes": int(usage["rss_bytes"])},
            "cpu": {
                "user_s": round(usage["cpu_user_s"], 3),
                "system_s": round(usage["cpu_system_s"], 3),
                "percent": round(self._cpu_percent, 1),
            },
            "nodes": len(core.registry.nodes),
            "clients": len(core.clients),
            "queued": core.queued,
            "counters": counters,
        }
        return {
            "broker": self.name,
            "time": now,
            "healthz": {"broker": self.name, "live": True, "ready": not core.draining},
            "varz": varz,
            "nodes": {"broker": self.name, "nodes": nodes},
            "services": {"broker": self.name, "services": self._services(core)},
            "clients": self._clients(core, now),
            "cluster": self._cluster(cluster, now),
            "events": self._events(core),
            "errors": errors,
            "history": list(self._history),
        }

    # ------------------------------------------------------------------ parts

    def _cluster(self, status: Mapping[str, Any] | None, now: float) -> dict[str, Any]:
        """The /cluster section: this broker's view of the cluster, or standalone."""
        if status is None:
            return {
                "mode": "standalone",
                "role": "standalone",
                "term": None,
                "commit_index": None,
                "leader": None,
                "brokers": [{"name": self.name, "role": "standalone", "state": "up", "last_seen": now}],
                "peers": [],
            }
        leader = status["leader"]
        brokers = [{"name": self.name, "role": status["role"], "state": "up", "last_seen": now}]
        peers = []
        for name, peer in status["peers"].items():
            silent = peer["silent_s"]
            state = judge(silent, PEER_SUSPECT_S, PEER_DEAD_S).value
            role = "leader" if name == leader else "follower" if peer["voter"] else "learner"
            last_seen = now - silent if silent is not None else 0.0
            brokers.append({"name": name, "role": role, "state": state, "last_seen": last_seen})
            peers.append({"name": name, **peer})
        return {
            "mode": "cluster",
            "role": status["role"],
            "term": status["term"],
            "commit_index": status["commit_index"],
            "leader": leader,
            "applied_index": status["applied_index"],
            "last_index": status["last_index"],
            "snapshot_index": status["snapshot_index"],
            "counters": status["counters"],
            "brokers": brokers,
            "peers": peers,
        }

    def _rate(self, now: float, counters: dict[str, int], out: int, cpu: float) -> None:
        last = self._last
        self._last = (now, counters, out, cpu)
        if last is None or now <= last[0]:
            return
        dt = now - last[0]
        done = sum(counters.get(k, 0) - last[1].get(k, 0) for k in _FINISHED)
        self._rates = {
            "commands_per_s": round(done / dt, 1),
            "messages_in_per_s": round((counters.get("messages_in", 0) - last[1].get("messages_in", 0)) / dt, 1),
            "messages_out_per_s": round((out - last[2]) / dt, 1),
        }
        self._cpu_percent = max(0.0, 100.0 * (cpu - last[3]) / dt)

    def _chart_point(self, now: float, counters: dict[str, int], errors: dict[str, Any]) -> None:
        last = self._last_point
        if last is not None and now - last[0] < HISTORY_S:
            return
        by_category = errors["by_category"]
        total = sum(by_category.values())
        self._last_point = (now, {**counters, **{f"category_{k}": v for k, v in by_category.items()}}, total)
        if last is None:
            return
        dt = now - last[0]
        for entry in errors["by_code"]:  # what grew since the last point joins the recent errors
            grew = entry["count"] - last[1].get(f"error_{entry['code']}", 0)
            if grew > 0:
                self._errors.append({**entry, "time": round(now, 3), "count": grew})
        fresh, self._fresh = sorted(self._fresh), []
        self._history.append({
            "t": round(now, 3),
            "commands_per_s": self._rates["commands_per_s"],
            "p50_ms": _ms(percentile(fresh, 0.50)),
            "p99_ms": _ms(percentile(fresh, 0.99)),
            "errors_per_s": {
                cat: round((by_category.get(cat, 0) - last[1].get(f"category_{cat}", 0)) / dt, 2)
                for cat in _CATEGORIES
            },
        })

    def _nodes(self, core: Any, now: float) -> list[dict[str, Any]]:
        live = {node.identity.hex(): _node_view(node, now) for node in core.registry.nodes.values()}
        for nid, view in self._seen.items():
            if nid not in live:  # expired or unregistered since the last snapshot
                self._dead[nid] = {**view, "state": "dead", "in_flight": 0, "load": 0.0}
        for nid in [n for n, v in self._dead.items() if n in live or now - v["last_seen"] > DEAD_KEPT_S]:
            del self._dead[nid]
        while len(self._dead) > DEAD_KEPT:
            del self._dead[min(self._dead, key=lambda n: self._dead[n]["last_seen"])]
        self._seen = live
        dead = [{**v, "silence_s": round(now - v["last_seen"], 3)} for v in self._dead.values()]
        return sorted([*live.values(), *dead], key=lambda v: (v["name"], v["id"]))

    @staticmethod
    def _services(core: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for svc, entry in core.registry.describe().items():
            out[svc] = {
                "nodes": entry["nodes"],
                "actions": {
                    act: {
                        "idempotent": spec["idempotent"],
                        "description": spec["description"],
                        "queued": len(core.queues.get((svc, act), ())),
                    }
                    for act, spec in entry["actions"].items()
                },
            }
        return out

    @staticmethod
    def _clients(core: Any, now: float) -> dict[str, Any]:
        recent = sorted(core.clients.items(), key=lambda kv: kv[1].last_activity, reverse=True)[:LISTED]
        return {
            "total": len(core.clients),
            "listed": len(recent),
            "clients": [
                {
                    "id": ident.hex(),
                    "messages": conn.message_count,
                    "pending": len(conn.pending_commands),
                    "last_activity": conn.last_activity,
                    "idle_s": round(max(0.0, now - conn.last_activity), 3),
                }
                for ident, conn in recent
            ],
        }

    @staticmethod
    def _events(core: Any) -> dict[str, Any]:
        stats = core.events.stats()
        subscribers = stats["subscribers"]
        return {
            "topics": stats["topics"],
            "retained_events": stats["retained_events"],
            "retained_bytes": stats["retained_bytes"],
            "subscriptions": core.subscribers.in_force,
            "subscribers": len(subscribers),
            "missed": sum(s["missed"] for s in subscribers.values()),
            "retention": [
                {"prefix": r.prefix, "max_events": r.max_events, "max_bytes": r.max_bytes}
                for r in core.config.retention
            ],
            "reports": [{"subscriber": str(k), **v} for k, v in list(subscribers.items())[:LISTED]],
            "counters": {k: int(v) for k, v in stats["counters"].items()},
        }

    def _errors_view(self, core: Any, counters: dict[str, int]) -> dict[str, Any]:
        by_code: dict[int, int] = {}
        for key, value in counters.items():
            if key.startswith("error_") and key[6:].isdigit():
                by_code[int(key[6:])] = by_code.get(int(key[6:]), 0) + value
        by_category = dict.fromkeys(_CATEGORIES, 0)
        for code, value in by_code.items():
            cat = _category(code)
            by_category[cat] = by_category.get(cat, 0) + value
        audit: list[dict[str, Any]] = []
        if core.security is not None:
            audit = [{**r, "name": _error_name(r["code"]), "category": _category(r["code"])}
                     for r in core.security.gate.stats()["audit"]]
        return {
            "total": sum(by_code.values()),
            "by_category": by_category,
            "by_code": [
                {"code": code, "name": _error_name(code), "category": _category(code), "count": value}
                for code, value in sorted(by_code.items())
            ],
            "recent": [],  # filled in by snapshot() once the chart point is taken
            "uncoded": {k: counters.get(k, 0) for k in ("malformed", "internal_errors", "undeliverable",
                                                         "unexpected_replies", "late_replies", "events_refused")},
            "security_audit": audit,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
