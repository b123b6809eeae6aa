"""Does a history of counter increments and reads look like a correct system's? Sans-IO.

Rules of this module (docs/operations.md, "Reading a history", says the same for users):

* A history is JSON records, two per operation: an `invoke` and its completion, `ok`
  (the mesh answered with a result), `fail` (it answered with an error that proves the
  command did not run) or `info` (the outcome is unknown: a timeout, a lost node, a
  failover). Times are `CLOCK_MONOTONIC` seconds, one clock for every process of the
  machine (network namespaces share it), so operations of different clients compare.
* Operations are `incr` (`kv.incr` by 1; `value` is the counter after it) and `read`
  (`kv.get`; `value` is the counter, 0 when missing). Every counter starts at 0.
* Per key, with A acknowledged increments, U unknown ones and F the final value read
  after the faults ended:
  - lost: an acknowledged increment missing from F: max(A - F, number of acked values
    above F);
  - doubled: increments applied more than once: F - (A + U) when positive, or the
    largest lead of a value (acked or read) over the increments invoked before it was
    answered, whichever is larger (each new lead is reported once, where it appears);
  - duplicate values: one value acknowledged to two increments (each extra one counts);
  - stale: a read below a value acknowledged (or read) before the read was invoked;
  - backward: a read below an earlier value the same client saw on that key.
* Every invocation must be completed (`unanswered` otherwise), every `fail`/`info`
  must carry an error code (`uncoded`), and no operation may take longer than its
  budget plus `slack` (`overdue`): every call is answered or times out with its code.
* Nothing here reads a clock or a file; `run.py` feeds it.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

__all__ = ["Op", "Anomaly", "KeyFigures", "Verdict", "pair", "check", "stalls", "percentile", "exits", "agreement"]

MAX_EXAMPLES: Final = 20
COMPLETIONS: Final = frozenset({"ok", "fail", "info"})


@dataclass(slots=True)
class Op:
    """One operation: its invocation and (once it came) its completion."""

    process: str
    index: int
    f: str  # "incr" or "read"
    key: str
    id: str  # the command id the client sent (one per call, resends keep it)
    invoked: float
    budget: float
    completed: float | None = None
    type: str | None = None  # ok / fail / info; None while unanswered
    value: int | None = None
    code: int | None = None


@dataclass(frozen=True, slots=True)
class Anomaly:
    """One thing the checker complains about, with the operation(s) to look up in the history."""

    kind: str
    key: str
    detail: str
    ops: tuple[str, ...]  # "process#index id=..." of the operations involved


@dataclass(slots=True)
class KeyFigures:
    acked: int = 0
    unknown: int = 0
    failed: int = 0
    reads: int = 0
    final: int | None = None
    lost: int = 0
    doubled: int = 0
    duplicate_values: int = 0
    stale: int = 0
    backward: int = 0


@dataclass(slots=True)
class Verdict:
    """The figures of one history and what is wrong with it."""

    ops: int = 0
    ok: int = 0
    fail: int = 0
    info: int = 0
    unanswered: int = 0
    uncoded: int = 0
    overdue: int = 0
    codes: Counter[int] = field(default_factory=Counter)
    keys: dict[str, KeyFigures] = field(default_factory=dict)
    anomalies: list[Anomaly] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)  # anomaly kind -> number

    def total(self, name: str) -> int:
        """The sum of one `KeyFigures` field over every key."""
        return sum(getattr(k, name) for k in self.keys.values())

    @property
    def valid(self) -> bool:
        return not self.counts

    def note(self, kind: str, key: str, detail: str, ops: Sequence[Op], n: int = 1) -> None:
        self.counts[kind] += n
        if len(self.anomalies) < MAX_EXAMPLES:
            self.anomalies.append(Anomaly(kind, key, detail, tuple(f"{o.process}#{o.index} id={o.id}" for o in ops)))

    def figures(self) -> dict[str, Any]:
        return {
            "ops": self.ops, "ok": self.ok, "fail": self.fail, "info": self.info,
            "unanswered": self.unanswered, "uncoded": self.uncoded, "overdue": self.overdue,
            "lost": self.total("lost"), "doubled": self.total("doubled"),
            "duplicate_values": self.total("duplicate_values"), "stale": self.total("stale"),
            "backward": self.total("backward"),
            "codes": {str(c): n for c, n in sorted(self.codes.items())},
            "anomalies": [asdict(a) for a in self.anomalies],
        }  # fmt: skip


def pair(records: Iterable[Mapping[str, Any]]) -> list[Op]:
    """Operations from history records (any order of processes; each process's in its order).

    Raises:
        ValueError: a completion without its invocation, or a record of no known type.
    """
    open_: dict[tuple[str, int], Op] = {}
    out: list[Op] = []
    for r in records:
        k = (r["process"], int(r["op"]))
        if r["type"] == "invoke":
            op = Op(r["process"], int(r["op"]), r["f"], r["key"], r["id"], float(r["mono"]), float(r["budget"]))
            open_[k] = op
            out.append(op)
        elif r["type"] in COMPLETIONS:
            if k not in open_:
                raise ValueError(f"completion of {k} without its invocation")
            op = open_.pop(k)
            op.completed, op.type, op.value, op.code = float(r["mono"]), r["type"], r.get("value"), r.get("code")
        else:
            raise ValueError(f"unknown history record type {r['type']!r}")
    return out


def check(ops: Sequence[Op], finals: Mapping[str, int], *, slack: float = 2.0) -> Verdict:
    """Check a whole history against the counter rules of the module docstring.

    Args:
        ops: every operation of every client (from `pair`).
        finals: key -> value read once every fault had ended and every client stopped.
        slack: seconds an answer may come after the call's budget.

    Returns:
        The verdict; `valid` is False when any rule is broken.
    """
    v = Verdict()
    by_key: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        v.ops += 1
        by_key[op.key].append(op)
        if op.type is None:
            v.unanswered += 1
            v.note("unanswered", op.key, "invoked, never completed", [op])
            continue
        setattr(v, op.type, getattr(v, op.type) + 1)
        if op.type != "ok":
            if op.code is None:
                v.uncoded += 1
                v.note("uncoded", op.key, f"{op.type} without an error code", [op])
            else:
                v.codes[op.code] += 1
        assert op.completed is not None
        if op.completed - op.invoked > op.budget + slack:
            v.overdue += 1
            v.note("overdue", op.key, f"answered after {op.completed - op.invoked:.2f}s, budget {op.budget}s", [op])
    for key, key_ops in sorted(by_key.items()):
        v.keys[key] = _check_key(v, key, key_ops, finals.get(key))
    return v


def _check_key(v: Verdict, key: str, ops: list[Op], final: int | None) -> KeyFigures:
    kf = KeyFigures(final=final)
    incrs = [o for o in ops if o.f == "incr"]
    kf.acked = sum(o.type == "ok" for o in incrs)
    kf.unknown = sum(o.type in ("info", None) for o in incrs)
    kf.failed = sum(o.type == "fail" for o in incrs)
    kf.reads = sum(o.f == "read" for o in ops)
    acked_values = [o for o in incrs if o.type == "ok" and isinstance(o.value, int)]
    # duplicate values: one value acknowledged to two increments
    seen: dict[int, Op] = {}
    for o in sorted(acked_values, key=lambda o: o.completed or 0.0):
        assert o.value is not None
        if o.value in seen:
            kf.duplicate_values += 1
            v.note("duplicate value", key, f"value {o.value} acknowledged twice", [seen[o.value], o])
        else:
            seen[o.value] = o
    if final is None:
        v.note("no final value", key, "the final read failed", [])
    else:
        above = [o for o in acked_values if o.value is not None and o.value > final]
        kf.lost = max(kf.acked - final, len(above), 0)
        if kf.lost:
            v.note("lost", key, f"{kf.acked} acknowledged, final {final}", above[:2], kf.lost)
        if final > kf.acked + kf.unknown:
            kf.doubled = final - kf.acked - kf.unknown
            v.note("doubled", key, f"final {final} > {kf.acked} acknowledged + {kf.unknown} unknown", [], kf.doubled)
    # impossible values: more than the increments invoked before the answer
    starts = sorted(o.invoked for o in incrs)
    excess = 0  # the largest lead of a value over the increments invoked before it: doubles so far
    for o in sorted(ops, key=lambda o: o.completed or 0.0):
        if o.type == "ok" and isinstance(o.value, int) and o.completed is not None:
            invoked = bisect.bisect_right(starts, o.completed)
            if o.value - invoked > excess:
                excess = o.value - invoked
                v.note("doubled", key, f"value {o.value} but only {invoked} increments invoked", [o])
    kf.doubled = max(kf.doubled, excess)
    _check_reads(v, key, ops, kf)
    return kf


def _check_reads(v: Verdict, key: str, ops: list[Op], kf: KeyFigures) -> None:
    """Stale reads (below what was known before the read began) and backward reads per client."""
    known = sorted(((o.completed, o.value, o) for o in ops
                    if o.type == "ok" and isinstance(o.value, int) and o.completed is not None),
                   key=lambda t: t[0])  # fmt: skip
    times = [t for t, _, _ in known]
    best: list[tuple[int, Op | None]] = []  # prefix maximum of the values, with the op that gave it
    top: tuple[int, Op | None] = (0, None)
    for _, value, o in known:
        if value > top[0]:
            top = (value, o)
        best.append(top)
    last_seen: dict[str, tuple[int, Op]] = {}
    for o in sorted(ops, key=lambda o: (o.process, o.index)):
        if o.type != "ok" or not isinstance(o.value, int):
            continue
        if o.f == "read":
            i = bisect.bisect_left(times, o.invoked)
            floor, source = best[i - 1] if i else (0, None)
            if o.value < floor:
                kf.stale += 1
                v.note("stale", key, f"read {o.value} after {floor} was acknowledged", [o, *([source] if source else [])])
        prev = last_seen.get(o.process)
        if prev is not None and o.value < prev[0]:
            kf.backward += 1
            v.note("backward", key, f"{o.process} saw {prev[0]} then {o.value}", [prev[1], o])
        if prev is None or o.value >= prev[0]:
            last_seen[o.process] = (o.value, o)


def stalls(ops: Sequence[Op], starts: Iterable[float], processes: Iterable[str]) -> list[float]:
    """How long each client stopped making progress at each fault.

    The stall of a client at a fault that began at `start` is the time from `start` until
    the client completes (ok) an operation it invoked at or after `start`; infinity when it
    never does. One figure per (fault, client).
    """
    firsts: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for o in ops:
        if o.type == "ok" and o.completed is not None:
            firsts[o.process].append((o.invoked, o.completed))
    for lst in firsts.values():
        lst.sort()
    out = []
    names = list(processes)
    for start in starts:
        for p in names:
            lst = firsts.get(p, [])
            i = bisect.bisect_left(lst, (start, -math.inf))
            done = min((c for _, c in lst[i:]), default=math.inf)
            out.append(done - start)
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (nearest rank) of `values`; NaN when there are none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def exits(codes: Iterable[tuple[str, int]], killed: Mapping[str, int]) -> dict[str, int]:
    """Classify process exits seen while the mesh was up.

    Args:
        codes: (process name, exit status) for every exit `mesh up` reported.
        killed: process name -> number of SIGKILLs the nemesis sent it.

    Returns:
        `aborts` (SIGABRT: -6 or 134), `killed` (SIGKILL exits the nemesis explains) and
        `unexpected` (every other exit, and SIGKILLs nobody sent).
    """
    left = dict(killed)
    out = {"aborts": 0, "killed": 0, "unexpected": 0}
    for name, code in codes:
        if code in (-6, 134):
            out["aborts"] += 1
        elif code in (-9, 137) and left.get(name, 0) > 0:
            left[name] -= 1
            out["killed"] += 1
        else:
            out["unexpected"] += 1
    return out


def agreement(pages: Mapping[str, Mapping[str, Any] | None]) -> list[str]:
    """Problems with the brokers' /cluster pages: each must answer, and all must name
    one leader and one term, with that leader the one broker whose role is leader."""
    problems = [f"{b}: no /cluster page" for b, p in sorted(pages.items()) if p is None]
    if problems:
        return problems
    leaders = {p["leader"] for p in pages.values() if p is not None}
    terms = {p["term"] for p in pages.values() if p is not None}
    roles = {b: p["role"] for b, p in pages.items() if p is not None}
    if len(leaders) != 1 or None in leaders:
        problems.append(f"leaders differ or are missing: {sorted(map(str, leaders))}")
    if len(terms) != 1:
        problems.append(f"terms differ: {sorted(terms)}")
    if sorted(roles.values()) != ["follower"] * (len(roles) - 1) + ["leader"] or (
        len(leaders) == 1 and roles.get(str(next(iter(leaders)))) != "leader"
    ):
        problems.append(f"roles: {roles}")
    return problems
