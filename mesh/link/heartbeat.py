"""The node-broker heartbeat: what a peer's silence means, the same at both ends.

A broker judges its nodes and a node judges its brokers by one rule (a number of missed
heartbeat intervals), so both sides agree when a link is suspect and when it is dead.
The states and their transitions are `mesh.link.health`'s; only the thresholds live here.
"""

from __future__ import annotations

from typing import Final

from .health import SILENCE_EVENT, PeerEvent, judge

__all__ = ["DEFAULT_HEARTBEAT_S", "LIVENESS_MISSES", "SUSPECT_MISSES", "silence_event"]

DEFAULT_HEARTBEAT_S: Final = 1.0
# A node silent for this many of its heartbeat intervals is dead (any message counts).
LIVENESS_MISSES: Final = 3
# ... and suspect past this many: one heartbeat missed, with half an interval of grace,
# because a heartbeat timer always fires a little late and a healthy node must not flap.
SUSPECT_MISSES: Final = 1.5


def silence_event(silence: float, interval: float) -> PeerEvent | None:
    """What `silence` seconds mean for a peer heartbeating every `interval` (None: nothing yet).

    The node-broker heartbeat's thresholds (`SUSPECT_MISSES`, `LIVENESS_MISSES`
    intervals) on the shared rule, `mesh.link.health.judge`.
    """
    return SILENCE_EVENT[judge(silence, SUSPECT_MISSES * interval, LIVENESS_MISSES * interval)]
