"""Every state machine of the mesh, walked pair by pair against its expected table, and the shared health rule.

The expected tables are written out here, apart from the code, so a changed, added or
removed entry in `mesh.protocol.states.TRANSITIONS`, `mesh.link.health.TRANSITIONS` or
`mesh.cluster.raft.TRANSITIONS` fails a test instead of being read back as the truth.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from enum import Enum

import pytest

from mesh.cluster import raft
from mesh.link import health
from mesh.link.health import SILENCE_EVENT, PeerEvent, PeerState, judge
from mesh.protocol import ErrorCode, InvalidStateError, states, transition

# state event -> next state, one line per allowed pair; every other pair must raise.
EXPECTED = {
    "command": (states.CommandState, states.CommandEvent, states.TRANSITIONS, """
        received   enqueue  queued
        received   dispatch dispatched
        received   fail     failed
        received   expire   timed_out
        queued     dispatch dispatched
        queued     fail     failed
        queued     expire   timed_out
        dispatched respond  completed
        dispatched fail     failed
        dispatched expire   timed_out
        dispatched requeue  queued
    """),
    "health": (PeerState, PeerEvent, health.TRANSITIONS, """
        up      heard     up
        up      quiet     suspect
        up      silent    dead
        up      dropped   dead
        suspect heard     up
        suspect quiet     suspect
        suspect silent    dead
        suspect dropped   dead
        dead    heard     up
        dead    quiet     dead
        dead    silent    dead
        dead    connected suspect
    """),
    "raft role": (raft.Role, raft.RoleEvent, raft.TRANSITIONS, """
        follower      election_timeout pre_candidate
        follower      newer_term       follower
        follower      leader_seen      follower
        pre_candidate election_timeout pre_candidate
        pre_candidate pre_vote_won     candidate
        pre_candidate vote_lost        follower
        pre_candidate newer_term       follower
        pre_candidate leader_seen      follower
        candidate     election_timeout pre_candidate
        candidate     vote_won         leader
        candidate     vote_lost        follower
        candidate     newer_term       follower
        candidate     leader_seen      follower
        leader        newer_term       follower
        leader        quorum_lost      follower
        learner       newer_term       learner
        learner       leader_seen      learner
    """),
}


def expected_pairs(text: str) -> dict[tuple[str, str], str]:
    rows = [line.split() for line in text.strip().splitlines()]
    return {(state, event): after for state, event, after in rows}


def differences(
    table: Mapping[tuple[Enum, Enum], Enum], state_type: type[Enum], event_type: type[Enum], expected: str
) -> list[str]:
    """Every (state, event) pair where `transition` over `table` disagrees with `expected`.

    An expected pair must give its target; any other pair must raise InvalidStateError
    with the stable code and details naming both.
    """
    want = expected_pairs(expected)
    wrong = []
    for state, event in itertools.product(state_type, event_type):
        target = want.get((state.value, event.value))
        try:
            got = transition(table, state, event, subject="a test machine").value
        except InvalidStateError as err:
            details_ok = err.code == ErrorCode.INVALID_STATE and err.details == {"state": state.value, "event": event.value}
            got = "refused" if details_ok else f"refused badly ({err.details})"
        if got != (target or "refused"):
            wrong.append(f"{state.value} + {event.value}: expected {target or 'refused'}, got {got}")
    return wrong


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_pair_of_every_table_does_what_the_expected_table_says(name: str) -> None:
    """Each allowed (state, event) gives its target and each other pair raises InvalidStateError naming both."""
    state_type, event_type, table, expected = EXPECTED[name]
    assert differences(table, state_type, event_type, expected) == []
    assert len(table) == len(expected_pairs(expected))


def test_the_walk_catches_a_changed_an_added_and_a_removed_entry() -> None:
    """A table edited in any of three ways is reported at exactly the pairs that changed."""
    edited = dict(health.TRANSITIONS)
    edited[(PeerState.DEAD, PeerEvent.HEARD)] = PeerState.DEAD  # changed
    edited[(PeerState.UP, PeerEvent.CONNECTED)] = PeerState.UP  # added
    del edited[(PeerState.SUSPECT, PeerEvent.DROPPED)]  # removed
    assert differences(edited, PeerState, PeerEvent, EXPECTED["health"][3]) == [
        "up + connected: expected refused, got up",
        "suspect + dropped: expected dead, got refused",
        "dead + heard: expected up, got dead",
    ]


def test_a_refused_transition_says_what_refused_what_and_carries_extra_details() -> None:
    """The message names the subject, state and event; extra details ride along with the code."""
    with pytest.raises(InvalidStateError) as info:
        transition(health.TRANSITIONS, PeerState.UP, PeerEvent.CONNECTED, subject="a link", endpoint="tcp://x:1")
    assert info.value.message == "a link in state up cannot take connected, endpoint tcp://x:1"
    assert info.value.details == {"state": "up", "event": "connected", "endpoint": "tcp://x:1"}
    assert info.value.code == ErrorCode.INVALID_STATE and not info.value.retryable


@pytest.mark.parametrize(
    ("silence", "passed", "reached"),
    [
        (None, PeerState.DEAD, PeerState.DEAD),
        (0.0, PeerState.UP, PeerState.UP),
        (0.99, PeerState.UP, PeerState.UP),
        (1.0, PeerState.UP, PeerState.SUSPECT),
        (1.01, PeerState.SUSPECT, PeerState.SUSPECT),
        (3.0, PeerState.SUSPECT, PeerState.DEAD),
        (3.01, PeerState.DEAD, PeerState.DEAD),
    ],
)
def test_silence_is_judged_against_the_thresholds_passed_or_reached(
    silence: float | None, passed: PeerState, reached: PeerState
) -> None:
    """Past a threshold crosses it; with reached=True, equal does too; never heard is dead."""
    assert judge(silence, 1.0, 3.0) is passed
    assert judge(silence, 1.0, 3.0, reached=True) is reached


def test_each_judgement_calls_for_the_event_that_leads_there() -> None:
    """Applying SILENCE_EVENT of a judgement to an up peer lands in that judgement."""
    for judged, event in SILENCE_EVENT.items():
        after = PeerState.UP if event is None else transition(health.TRANSITIONS, PeerState.UP, event, subject="a peer")
        assert after is judged
