"""Whether the peer at the other end of a link still speaks: up, suspect or dead.

One rule for every role. A broker watching its nodes, a node watching its brokers, a
client watching its broker and the monitor showing nodes and cluster peers all judge
silence here and move a peer's state through the one table below; each passes its own
thresholds, because each link speaks at its own rate.

Rules of this module:

* `judge(silence, suspect_after, dead_after)`: silent past `suspect_after` seconds is
  `SUSPECT`, past `dead_after` is `DEAD`, else `UP`; a peer never heard from (`None`) is
  `DEAD`. With `reached=True` a silence equal to a threshold already crosses it. The
  thresholds stay with their callers (`mesh.link.heartbeat.silence_event`,
  `mesh.liveness.Liveness`, `mesh.monitor.snapshot`); docs/reliability.md lists them.
* A peer's state changes only through `TRANSITIONS`, looked up by
  `mesh.protocol.states.transition`; a pair missing from the table is a bug in the
  caller and raises `InvalidStateError`. `SILENCE_EVENT` turns a judgement into the
  event to apply.
* Any message proves a peer alive, even a dead one: a node keeps heartbeating a broker
  that went away, which may come back (a broker forgets a dead node instead, which must
  register again). A late check may find a peer dead without passing through suspect.
* `DROPPED` (the transport closed the connection) and `CONNECTED` (the watcher replaced
  a dead link with a new one, which starts suspect until it speaks) are for a client's
  link to its broker.
* Nothing here reads a clock, opens a socket or sleeps: silence comes in as seconds.
"""

from __future__ import annotations

import enum
import operator
from typing import Final

__all__ = ["PeerState", "PeerEvent", "TRANSITIONS", "SILENCE_EVENT", "judge"]


class PeerState(enum.StrEnum):
    """How a peer's silence looks from this side of the link (values as the monitor shows them)."""

    UP = "up"
    SUSPECT = "suspect"
    DEAD = "dead"


class PeerEvent(enum.StrEnum):
    """What happened on a link, as the table takes it."""

    HEARD = "heard"  # any message from the peer
    QUIET = "quiet"  # silent past the suspect threshold
    SILENT = "silent"  # silent past the dead threshold
    DROPPED = "dropped"  # the transport closed the connection
    CONNECTED = "connected"  # a new link replaced the dead one


P, V = PeerState, PeerEvent

TRANSITIONS: Final[dict[tuple[PeerState, PeerEvent], PeerState]] = {
    (P.UP, V.HEARD): P.UP,
    (P.UP, V.QUIET): P.SUSPECT,
    (P.UP, V.SILENT): P.DEAD,  # a late check may skip suspect
    (P.UP, V.DROPPED): P.DEAD,
    (P.SUSPECT, V.HEARD): P.UP,
    (P.SUSPECT, V.QUIET): P.SUSPECT,
    (P.SUSPECT, V.SILENT): P.DEAD,
    (P.SUSPECT, V.DROPPED): P.DEAD,
    (P.DEAD, V.HEARD): P.UP,
    (P.DEAD, V.QUIET): P.DEAD,
    (P.DEAD, V.SILENT): P.DEAD,
    (P.DEAD, V.CONNECTED): P.SUSPECT,
}

# The event a judgement of silence calls for (None: nothing to apply).
SILENCE_EVENT: Final[dict[PeerState, PeerEvent | None]] = {P.UP: None, P.SUSPECT: V.QUIET, P.DEAD: V.SILENT}

del P, V


def judge(silence: float | None, suspect_after: float, dead_after: float, *, reached: bool = False) -> PeerState:
    """What `silence` seconds say about a peer, given the watcher's thresholds.

    Args:
        silence: seconds since the peer was last heard; None when it never was.
        suspect_after: seconds of silence past which the peer is suspect.
        dead_after: seconds of silence past which it is dead.
        reached: a silence equal to a threshold already crosses it.

    Returns:
        `DEAD`, `SUSPECT` or `UP`, checked in that order.
    """
    crossed = operator.ge if reached else operator.gt
    if silence is None or crossed(silence, dead_after):
        return PeerState.DEAD
    return PeerState.SUSPECT if crossed(silence, suspect_after) else PeerState.UP
