"""Command lifecycle as one transition table.

Rules of this module:

* Every command a broker accepts is in exactly one `CommandState`.
* A state changes only through `advance(state, event)`, which looks the pair up in
  `TRANSITIONS`; a pair missing from the table is a bug in the caller and raises
  `InvalidStateError`.
* COMPLETED, FAILED and TIMED_OUT are final: nothing leaves them.
"""

from __future__ import annotations

from enum import Enum
from typing import Final

from .errors import InvalidStateError

__all__ = ["CommandState", "CommandEvent", "TRANSITIONS", "FINAL_STATES", "advance"]


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
    """The state after `event`.

    Raises:
        InvalidStateError: the table has no entry for (state, event).
    """
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidStateError(
            f"command in state {state.value} cannot {event.value}",
            details={"state": state.value, "event": event.value},
        ) from None
