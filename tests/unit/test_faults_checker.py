"""The fault suite's checker on hand-written histories: correct ones pass, and each kind of
wrong one (a lost acknowledgement, a double application, a stale read, a backward read, an
unanswered or uncoded call) is caught and named."""

from __future__ import annotations

import math
from typing import Any

import pytest

from mesh.faults import checker
from mesh.faults.nemesis import NEMESES, schedule


class H:
    """Builds history records: one client's operations, invoked and completed at given times."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.n: dict[str, int] = {}

    def op(self, process: str, f: str, key: str, start: float, end: float | None, kind: str = "ok",
           value: int | None = None, code: int | None = None) -> None:  # fmt: skip
        i = self.n[process] = self.n.get(process, 0) + 1
        base = {"process": process, "op": i, "f": f, "key": key, "id": f"{process}-{i}"}
        self.records.append({**base, "type": "invoke", "mono": start, "budget": 5.0})
        if end is not None:
            self.records.append({**base, "type": kind, "mono": end, "value": value, "code": code})

    def check(self, finals: dict[str, int]) -> checker.Verdict:
        return checker.check(checker.pair(self.records), finals)


def _counter(h: H) -> None:
    """Two writers on one key (values 1..4) and a reader that sees them in order."""
    h.op("a", "incr", "k", 0.0, 0.1, value=1)
    h.op("b", "incr", "k", 0.05, 0.2, value=2)
    h.op("a", "incr", "k", 0.3, 0.4, value=3)
    h.op("r", "read", "k", 0.35, 0.45, value=3)
    h.op("b", "incr", "k", 0.5, 0.6, value=4)
    h.op("r", "read", "k", 0.7, 0.8, value=4)


def test_a_correct_history_passes() -> None:
    """Invariant: a history a correct counter could give breaks no rule."""
    h = H()
    _counter(h)
    v = h.check({"k": 4})
    assert v.valid, v.anomalies
    assert (v.ops, v.ok, v.keys["k"].acked, v.keys["k"].reads) == (6, 6, 4, 2)


def test_unknown_outcomes_may_or_may_not_have_applied() -> None:
    """Invariant: an `info` increment may count once or not at all: final 4 or 5 both pass."""
    for final in (4, 5):
        h = H()
        _counter(h)
        h.op("a", "incr", "k", 0.9, 6.0, kind="info", code=3004)
        assert h.check({"k": final}).valid


def test_a_lost_acknowledgement_is_caught() -> None:
    """Invariant: no acknowledged increment is missing from the final value."""
    h = H()
    _counter(h)
    v = h.check({"k": 3})
    assert v.counts["lost"] == 1 and v.total("lost") == 1
    assert v.anomalies[0].kind == "lost" and v.anomalies[0].ops[0].startswith("b#2 ")


def test_a_double_application_is_caught_by_the_final_value() -> None:
    """Invariant: the final value is at most the acknowledged plus the unknown increments."""
    h = H()
    _counter(h)
    h.op("a", "incr", "k", 0.9, 6.0, kind="info", code=3005)
    v = h.check({"k": 6})
    assert v.total("doubled") == 1 and not v.valid


def test_a_double_application_is_caught_by_an_impossible_value() -> None:
    """Invariant: no value exceeds the increments invoked before it was answered (the
    final value alone would hide a double covered by a later lost increment)."""
    h = H()
    h.op("a", "incr", "k", 0.0, 0.1, value=1)
    h.op("a", "incr", "k", 0.2, 0.3, value=3)  # applied twice: only two increments were ever invoked
    v = h.check({"k": 2})
    assert v.total("doubled") == 1


def test_a_value_acknowledged_twice_is_caught() -> None:
    """Invariant: each increment's returned value is unique (else two increments were one)."""
    h = H()
    h.op("a", "incr", "k", 0.0, 0.1, value=1)
    h.op("b", "incr", "k", 0.0, 0.1, value=1)
    v = h.check({"k": 1})
    assert v.total("duplicate_values") == 1 and v.total("lost") == 1


def test_a_stale_read_is_caught() -> None:
    """Invariant: a read never returns less than a value acknowledged before it began."""
    h = H()
    h.op("a", "incr", "k", 0.0, 0.1, value=1)
    h.op("a", "incr", "k", 0.2, 0.3, value=2)
    h.op("r", "read", "k", 0.4, 0.5, value=1)
    v = h.check({"k": 2})
    assert v.total("stale") == 1 and v.anomalies[0].kind == "stale"


def test_a_read_concurrent_with_an_increment_may_miss_it() -> None:
    """Invariant (the other way): a read that began before the increment was acknowledged
    may return the old value; that is not stale."""
    h = H()
    h.op("a", "incr", "k", 0.0, 0.5, value=1)
    h.op("r", "read", "k", 0.1, 0.2, value=0)
    assert h.check({"k": 1}).valid


def test_a_backward_read_is_caught() -> None:
    """Invariant: one client's reads of a key never go backwards (such a read is stale too:
    the client's own earlier read was known before it began)."""
    h = H()
    h.op("a", "incr", "k", 0.0, 1.0, value=1)
    h.op("a", "incr", "k", 0.0, 1.0, value=2)
    h.op("r", "read", "k", 0.1, 0.2, value=2)
    h.op("r", "read", "k", 0.3, 0.4, value=1)
    v = h.check({"k": 2})
    assert v.total("backward") == 1 and v.total("stale") == 1


def test_unanswered_uncoded_and_overdue_calls_are_caught() -> None:
    """Invariant: every call is answered, or times out with its code, within its budget."""
    h = H()
    h.op("a", "incr", "k", 0.0, None)
    h.op("b", "incr", "k", 0.0, 1.0, kind="info", code=None)
    h.op("c", "read", "k", 0.0, 60.0, value=0)
    v = h.check({"k": 0})
    assert (v.unanswered, v.uncoded, v.overdue) == (1, 1, 1)


def test_stalls_measure_until_each_client_completes_an_operation_begun_after_the_fault() -> None:
    """Invariant: a client's stall ends with an ok operation invoked at or after the fault,
    not with one that was already in flight; a client that never resumes stalls forever."""
    h = H()
    h.op("a", "incr", "k", 9.0, 10.5, value=1)  # in flight at the fault
    h.op("a", "incr", "k", 10.5, 11.2, value=2)
    h.op("b", "incr", "k", 9.5, 10.1, kind="info", code=3004)
    ops = checker.pair(h.records)
    assert checker.stalls(ops, [10.0], ["a", "b"]) == [pytest.approx(1.2), math.inf]
    assert checker.percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0 and checker.percentile([1.0, 2.0], 0.99) == 2.0


def test_exits_and_agreement() -> None:
    """Invariant: an abort is never explained by a kill, a SIGKILL nobody sent is unexpected,
    and brokers that differ on the leader or the term (or do not answer) are reported."""
    assert checker.exits([("broker:b1", -9), ("broker:b1", -6), ("broker:b2", -9), ("broker:b3", 1)], {"broker:b1": 1}) == {
        "aborts": 1, "killed": 1, "unexpected": 2}  # fmt: skip
    good = {"b1": {"leader": "b1", "term": 3, "role": "leader"}, "b2": {"leader": "b1", "term": 3, "role": "follower"}}
    assert checker.agreement(good) == []
    assert checker.agreement({**good, "b2": {"leader": "b2", "term": 4, "role": "leader"}})
    assert checker.agreement({**good, "b2": None}) == ["b2: no /cluster page"]


def test_schedules_are_seeded() -> None:
    """Invariant: one seed gives one schedule (a run can be replayed), another seed another."""
    a = schedule(7, list(NEMESES), 3)
    assert a == schedule(7, list(NEMESES), 3) != schedule(8, list(NEMESES), 3)
    assert sorted(r.nemesis for r in a) == sorted(list(NEMESES) * 3)
    quorum = next(r for r in a if r.nemesis == "pause-quorum")
    assert [s.action for s in quorum.steps] == ["stop", "stop", "cont", "cont"] and quorum.length == 23.0
