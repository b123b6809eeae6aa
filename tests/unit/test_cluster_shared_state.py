"""The cluster's replicated state machine: same entries in, same state out, on every broker."""

from __future__ import annotations

import msgpack
import pytest

from mesh.cluster.shared import (
    SNAPSHOT_SLICE,
    Claimed,
    Committed,
    Forgotten,
    Revoked,
    SharedState,
    claim_record,
    keyring_record,
    outcome_record,
    revoke_record,
)

ENTRIES = [
    claim_record("k1", "inst-a", "b1"),
    claim_record("k1", "inst-b", "b2"),  # loses: the first claim wins
    outcome_record("k1", [b"h1", b"p1"]),
    outcome_record("k1", [b"h2", b"p2"]),  # loses: the first outcome wins
    outcome_record("k9", [b"h", b"p"]),  # no claim: nobody waits for it
    revoke_record("jti-1", 2e9),
    msgpack.packb({"op": "future-op"}),
    b"\xff not msgpack",
]


def apply_all(state: SharedState, entries: list[bytes]) -> None:
    for index, data in enumerate(entries, start=1):
        state.apply(index, data)


def test_first_claim_and_first_outcome_win_and_effects_say_so() -> None:
    state = SharedState()
    apply_all(state, ENTRIES)
    assert state.claims == {"k1": ("inst-a", "b1")}
    assert state.outcomes == {"k1": (b"h1", b"p1")}
    assert state.take_effects() == [
        Claimed("k1", "inst-a", "b1"),
        Claimed("k1", "inst-a", "b1"),
        Committed("k1", (b"h1", b"p1")),
        Committed("k1", (b"h1", b"p1")),
        Forgotten("k9"),  # so that whoever proposed it stops
        Revoked("jti-1", 2e9),
    ]
    assert state.take_effects() == []
    assert (state.invalid, state.applied) == (2, len(ENTRIES))


def test_a_capture_is_the_state_when_captured_packed_in_the_snapshot_format() -> None:
    """capture() copies now and packs later (in the snapshot writer's thread): the bytes
    are the snapshot format exactly (one MessagePack map, as if packed at once, tables
    longer than one slice included), of the state at capture time, not at packing time."""
    state = SharedState()
    entries = []
    for i in range(2 * SNAPSHOT_SLICE + 7):
        entries += [claim_record(f"k{i}", f"inst-{i % 3}", "b1#1"), outcome_record(f"k{i}", [b"h%d" % i, b"p" * (i % 5)])]
    apply_all(state, entries + [revoke_record("jti-1", 2e9)])
    expected = msgpack.packb({
        "version": 1, "applied": state.applied,
        "claims": [[k, n, b] for k, (n, b) in state.claims.items()],
        "outcomes": [[k, h, p] for k, (h, p) in state.outcomes.items()],
        "forgotten": sorted(state.forgotten), "revoked": state.revoked, "runs": state.runs,
        "event_ids": [[t, i, q] for (t, i), q in state.event_ids.items()],
        "events": None, "policy": state.policy, "policy_changes": list(state.policy_changes),
        "keyring": state.keyring,
    }, use_bin_type=True)  # fmt: skip
    pack = state.capture()
    state.apply(state.applied + 1, claim_record("late", "inst-0", "b1#1"))  # after the capture
    data = pack()
    assert data == expected
    copy = SharedState()
    copy.restore(data)
    assert "late" not in copy.claims and len(copy.claims) == 2 * SNAPSHOT_SLICE + 7


def test_snapshot_restores_an_equal_state() -> None:
    state = SharedState()
    apply_all(state, ENTRIES)
    copy = SharedState()
    copy.restore(state.snapshot())
    assert (copy.claims, copy.outcomes, copy.revoked, copy.applied) == (
        state.claims, state.outcomes, state.revoked, state.applied,
    )  # fmt: skip
    assert copy.snapshot() == state.snapshot()


@pytest.mark.parametrize("data", [b"", msgpack.packb({"version": 99}), msgpack.packb({"version": 1})])
def test_a_damaged_snapshot_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        SharedState().restore(data)


def run_commands(state: SharedState, count: int, reply: list[bytes]) -> None:
    """Commands k0, k1, ... claimed and answered `reply`, one after the other."""
    apply_all(state, [r for i in range(count) for r in (claim_record(f"k{i}", "inst", "b1"), outcome_record(f"k{i}", reply))])


def test_tables_stay_bounded_oldest_first() -> None:
    state = SharedState(max_commands=3)
    run_commands(state, 5, [b"h", b"p"])
    assert list(state.claims) == ["k2", "k3", "k4"]
    assert sorted(state.outcomes) == ["k2", "k3", "k4"]


def test_outcome_bytes_stay_bounded_and_a_dropped_outcome_stays_known_as_forgotten() -> None:
    state = SharedState(max_outcome_bytes=10)
    run_commands(state, 3, [b"hh", b"pp"])
    assert list(state.outcomes) == ["k1", "k2"] and state.outcome_bytes == 8
    assert state.forgotten == {"k0"} and "k0" in state.claims  # a resend must not run it again
    state.take_effects()
    state.apply(state.applied + 1, outcome_record("k0", [b"late", b"one"]))
    assert state.take_effects() == [Forgotten("k0")] and "k0" not in state.outcomes  # the first won, then went
    copy = SharedState(max_outcome_bytes=10)
    copy.restore(state.snapshot())
    assert (copy.outcomes, copy.outcome_bytes, copy.forgotten) == (state.outcomes, 8, {"k0"})


def test_a_forgotten_key_is_let_go_with_its_claim() -> None:
    state = SharedState(max_commands=2, max_outcome_bytes=4)
    run_commands(state, 2, [b"hh", b"pp"])
    assert state.forgotten == {"k0"}
    state.apply(5, claim_record("k2", "inst", "b1"))
    assert list(state.claims) == ["k1", "k2"] and state.forgotten == set()


def _ring(generation: int, active: str, *kids: str, retire: float | None = None) -> dict:
    times = {k: {"active_from": None, "retire_at": retire if k != active else None} for k in kids}
    return {"generation": generation, "active": active, "keys": times}


def test_a_key_ring_of_a_later_generation_replaces_the_one_in_force_and_an_older_never_does() -> None:
    state = SharedState()
    first, rotated, stale = _ring(0, "k1", "k1"), _ring(1, "k2", "k1", "k2", retire=9.0), _ring(0, "k1", "k1")
    twin = _ring(1, "k9", "k1", "k9", retire=9.0)  # rotated elsewhere from the same ring
    apply_all(state, [keyring_record(r) for r in (stale, rotated, first, twin)])
    assert state.keyring == rotated  # committed first among the later ones; the older never win
    assert [e.ring for e in state.take_effects()] == [stale, rotated, rotated, rotated]
    state.apply(5, keyring_record(_ring(2, "k3", "k2", "k3")))
    assert state.keyring is not None and state.keyring["active"] == "k3"
    bad = [
        {"generation": 3, "active": "k9", "keys": {}},
        {"generation": 3, "active": "k1", "keys": {"k1": {"active_from": "soon", "retire_at": None}}},
        {**first, "generation": 3, "extra": 1},
        {"active": "k1", "keys": first["keys"]},
        {**first, "generation": -1},
        {"generation": 3, "active": "k1", "keys": {"k1": {"key": "c2VjcmV0", "active_from": None, "retire_at": None}}},
    ]
    for ring in bad:
        state.apply(state.applied + 1, keyring_record(ring))
    assert state.invalid == len(bad) and state.keyring["active"] == "k3"
    copy = SharedState()
    copy.restore(state.snapshot())
    assert copy.keyring == state.keyring
    copy.apply(99, keyring_record(rotated))
    assert copy.keyring == state.keyring


def test_a_claimant_names_its_broker_and_run() -> None:
    """`parse_claimant` undoes `claimant`; a claim of an older broker names no run."""
    from mesh.cluster.shared import claimant, parse_claimant

    assert parse_claimant(claimant("b-1/x", 17)) == ("b-1/x", 17)
    assert parse_claimant("b1") == ("b1", None) and parse_claimant("b1/") == ("b1/", None)
