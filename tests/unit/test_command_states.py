"""The command lifecycle table: every entry works, every other pair is refused, final states are final."""

from __future__ import annotations

import itertools

import pytest

from mesh.protocol import (
    FINAL_STATES,
    TRANSITIONS,
    CommandEvent,
    CommandState,
    ErrorCode,
    InvalidStateError,
    advance,
)

S, E = CommandState, CommandEvent

ALL_PAIRS = list(itertools.product(CommandState, CommandEvent))
MISSING = [pair for pair in ALL_PAIRS if pair not in TRANSITIONS]


def _pair_id(pair: object) -> str:
    state, event = pair  # type: ignore[misc]
    return f"{state.value}-{event.value}"


@pytest.mark.parametrize("pair, target", list(TRANSITIONS.items()), ids=[_pair_id(p) for p in TRANSITIONS])
def test_every_table_entry_advances_to_its_target(pair: tuple[CommandState, CommandEvent], target: CommandState) -> None:
    """advance(state, event) returns the state the table names."""
    state, event = pair
    assert advance(state, event) is target


@pytest.mark.parametrize("pair", MISSING, ids=[_pair_id(p) for p in MISSING])
def test_every_pair_missing_from_the_table_is_invalid_state(pair: tuple[CommandState, CommandEvent]) -> None:
    """A (state, event) pair the table lacks raises InvalidStateError naming both."""
    state, event = pair
    with pytest.raises(InvalidStateError) as info:
        advance(state, event)
    assert info.value.code == ErrorCode.INVALID_STATE
    assert info.value.details == {"state": state.value, "event": event.value}


def test_the_table_and_the_missing_pairs_cover_every_pair() -> None:
    """Every (state, event) pair is either in the table or refused; the table has 11 entries."""
    assert len(TRANSITIONS) + len(MISSING) == len(CommandState) * len(CommandEvent)
    assert len(TRANSITIONS) == 11


def test_the_final_states_are_completed_failed_and_timed_out() -> None:
    """FINAL_STATES is exactly COMPLETED, FAILED and TIMED_OUT."""
    assert FINAL_STATES == {S.COMPLETED, S.FAILED, S.TIMED_OUT}


@pytest.mark.parametrize("state", sorted(FINAL_STATES, key=lambda s: s.value), ids=lambda s: s.value)
def test_final_states_have_no_outgoing_transitions(state: CommandState) -> None:
    """Nothing leaves a final state: every event on it raises InvalidStateError."""
    assert not [pair for pair in TRANSITIONS if pair[0] is state]
    for event in CommandEvent:
        with pytest.raises(InvalidStateError):
            advance(state, event)


def test_the_states_without_outgoing_transitions_are_exactly_the_final_ones() -> None:
    """A state with no way out is final, and every non-final state has a way out."""
    sources = {state for state, _ in TRANSITIONS}
    assert set(CommandState) - sources == FINAL_STATES


@pytest.mark.parametrize("state", [s for s in CommandState if s not in FINAL_STATES], ids=lambda s: s.value)
def test_every_live_state_can_fail_and_expire(state: CommandState) -> None:
    """A command not yet answered can always be failed or timed out, so it is answered exactly once."""
    assert advance(state, E.FAIL) is S.FAILED
    assert advance(state, E.EXPIRE) is S.TIMED_OUT


def test_every_state_is_reachable_from_received() -> None:
    """Walking the table from RECEIVED reaches every state."""
    seen, todo = {S.RECEIVED}, [S.RECEIVED]
    while todo:
        state = todo.pop()
        for (source, _), target in TRANSITIONS.items():
            if source is state and target not in seen:
                seen.add(target)
                todo.append(target)
    assert seen == set(CommandState)


def test_only_respond_completes_and_only_from_dispatched() -> None:
    """COMPLETED is reached only by RESPOND on a dispatched command."""
    assert [pair for pair, target in TRANSITIONS.items() if target is S.COMPLETED] == [(S.DISPATCHED, E.RESPOND)]


def test_requeue_returns_a_dispatched_command_to_the_queue() -> None:
    """A command whose node vanished before receiving it goes back to QUEUED and can be dispatched again."""
    state = advance(advance(S.RECEIVED, E.DISPATCH), E.REQUEUE)
    assert state is S.QUEUED
    assert advance(state, E.DISPATCH) is S.DISPATCHED
