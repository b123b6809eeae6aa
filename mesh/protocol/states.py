"""State machines as transition tables: the one lookup every table uses, and the command lifecycle.

Rules of this module:

* A state machine of the mesh is a table `{(state, event): next_state}` over two enums,
  and its state changes only through `transition(table, state, event)`: a pair missing
  from the table is a bug in the caller and raises `InvalidStateError` naming both. The
  tables using it: `TRANSITIONS` here (commands), `mesh.link.health.TRANSITIONS` (a
  peer's health) and `mesh.cluster.raft.TRANSITIONS` (a Raft node's role).
* Every command a broker accepts is in exactly one `CommandState`, changed only by
  `advance(state, event)` (`transition` over the command table).
* COMPLETED, FAILED and TIMED_OUT are final: nothing leaves them.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any, Final, TypeVar

from .errors import InvalidStateError

__all__ = ["CommandState", "CommandEvent", "TRANSITIONS", "FINAL_STATES", "advance", "transition"]

StateT = TypeVar("StateT", bound=Enum)
EventT = TypeVar("EventT", bound=Enum)


def transition(
    table: Mapping[tuple[StateT, EventT], StateT],
    state: StateT,
    event: EventT,
    *,
    subject: str,
    **details: Any,
) -> StateT:
    """The state after `event`, as `table` says.

    Args:
        table: the machine's allowed `(state, event) -> next state` pairs.
        state: the current state.
        event: what happened.
        subject: what is in `state`, for the message ("a command", "a link").
        **details: more context for the error's details and message (e.g. a Raft
            term); formatted only when the pair is refused, so a hot path pays nothing.

    Returns:
        The next state.

    Raises:
        InvalidStateError: the table has no entry for (state, event); its details name
            both (`state`, `event`) and carry `details`.
    """
    try:
        return table[(state, event)]
    except KeyError:
        context = "".join(f", {key} {value}" for key, value in details.items())
        raise InvalidStateError(
            f"{subject} in state {state.value} cannot take {event.value}{context}",
            details={"state": state.value, "event": event.value, **details},
        ) from None


class CommandState(str, Enum):
    RECEIVED = "received"
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"


class CommandEvent(str, Enum):
    ENQUEUE = "enqueue"  # every capable node is at capacity
    DISPATCH = "dispatch"  # sent to a node
    REQUEUE = "requeue"  # the node vanished before it could receive the command
    RESPOND = "respond"  # the node answered with a response
    FAIL = "fail"  # refused by the broker, or the node answered with an error
    EXPIRE = "expire"  # the deadline passed first


S, E = CommandState, CommandEvent

TRANSITIONS: Final[dict[tuple[CommandState, CommandEvent], CommandState]] = {
    (S.RECEIVED, E.ENQUEUE): S.QUEUED,
    (S.RECEIVED, E.DISPATCH): S.DISPATCHED,
    (S.RECEIVED, E.FAIL): S.FAILED,
    (S.RECEIVED, E.EXPIRE): S.TIMED_OUT,
    (S.QUEUED, E.DISPATCH): S.DISPATCHED,
    (S.QUEUED, E.FAIL): S.FAILED,
    (S.QUEUED, E.EXPIRE): S.TIMED_OUT,
    (S.DISPATCHED, E.RESPOND): S.COMPLETED,
    (S.DISPATCHED, E.FAIL): S.FAILED,
    (S.DISPATCHED, E.EXPIRE): S.TIMED_OUT,
    (S.DISPATCHED, E.REQUEUE): S.QUEUED,
}

FINAL_STATES: Final = frozenset({S.COMPLETED, S.FAILED, S.TIMED_OUT})

del S, E


def advance(state: CommandState, event: CommandEvent) -> CommandState:
    """The command state after `event` (see `transition`).

    Raises:
        InvalidStateError: the command table has no entry for (state, event).
    """
    return transition(TRANSITIONS, state, event, subject="a command")
