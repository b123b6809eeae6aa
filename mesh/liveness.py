"""Whether the broker at the other end of a link still answers: a sans-IO state machine.

Rules of this module:

* Time comes in as `now` (a monotonic clock); nothing here reads a clock, opens a
  socket or sleeps. The client loop feeds it what it hears and ticks it.
* Any message from the broker proves it alive (`heard`). Silence only counts while the
  client is waiting for something (`tick(now, busy=True)`): an idle client asks the
  broker nothing, so its silence says nothing, and the clock is held at `now`.
* After one `interval` of silence the link is `SUSPECT` and one heartbeat is due; after
  `liveness` intervals it is `DEAD` (`mesh.link.health.judge` with these thresholds,
  reached rather than passed). A connection the transport reports closed while
  the client waits (`dropped`: the broker process died, its kernel closed the socket)
  is `DEAD` at once: no need to wait out a window for what is already known. At most one heartbeat is in flight per link: a
  second one is never queued behind an unanswered first, so a broker that comes back
  is not met by a pile of pings. A new link (`connected`) starts `SUSPECT` with one
  heartbeat due, to prove the new broker quickly.
* A link whose transport is connecting or connected but still in its handshake
  (`handshaking`: the broker's host has not yet answered the connection or has accepted
  it, and its SYN-ACK or CURVE/ZMTP answer may queue behind thousands of others, as when
  a broker restarts under all its clients) has been asked
  nothing yet: its silence counts from the end of the handshake, for at most
  `HANDSHAKE_GRACE_S` after the link opened, when that broker is the client's only one.
  Replacing such a link would only start its handshake again, and thousands of clients
  doing so keep a broker from ever catching up. A client with other brokers to try
  (`elsewhere`) gives no grace: a broker that accepts connections but never answers
  them (frozen, paused, a dead VM whose kernel still listens) would otherwise hold its
  calls for the whole grace while another broker could serve them. A broker that
  refuses connections never gets this grace.
* Every state change is a transition in `mesh.link.health.TRANSITIONS`, the table every
  role uses for its peers; an event with no entry for the current state is a bug in the
  caller and raises `InvalidStateError`.
* A process that was itself paused (SIGSTOP, a frozen VM, a loop stalled) heard nothing
  while it did not run, so the silence of its peers over that time says nothing about
  them. `PauseWatch` tells such a pause from a jump between the `now` values of a
  loop's regular turns (more than `SELF_PAUSE_S`); the caller then gives every peer its
  window afresh from the resume. A `Liveness` watches its own ticks this way.
* `backoff_delay` spaces reconnections: none while the list of brokers has not been
  tried through once since the last one answered, then doubling and capped, with
  jitter so that clients of one broker do not all come back at the same instant.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from .link.health import TRANSITIONS, PeerEvent, PeerState, judge
from .protocol.states import transition

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "BACKOFF_JITTER",
    "DEFAULT_INTERVAL",
    "DEFAULT_LIVENESS",
    "HANDSHAKE_GRACE_S",
    "Liveness",
    "PauseWatch",
    "SELF_PAUSE_S",
    "Tick",
    "Transition",
    "backoff_delay",
]

DEFAULT_INTERVAL: Final = 1.0
DEFAULT_LIVENESS: Final = 3
BACKOFF_BASE: Final = 0.1
BACKOFF_CAP: Final = 2.0
BACKOFF_JITTER: Final = 0.2
# The longest a connected link's handshake may keep its silence from counting (see the rules).
HANDSHAKE_GRACE_S: Final = 15.0
# More than this between two turns of a loop that turns every 50 to 100 ms: the process
# did not run (paused, frozen, or its loop stalled), and heard nothing meanwhile.
SELF_PAUSE_S: Final = 1.0


class PauseWatch:
    """Tells, from the `now` of each turn of a loop, that the process itself did not run.

    Args:
        threshold: a gap between two consecutive turns longer than this is a pause.
    """

    def __init__(self, threshold: float = SELF_PAUSE_S) -> None:
        self.threshold = threshold
        self.last: float | None = None
        self.pauses = 0  # pauses seen so far

    def turn(self, now: float) -> float:
        """Note one turn of the loop at `now`.

        Returns:
            The gap since the previous turn when it was a pause (longer than the
            threshold), else 0.0. The first turn, and a clock that went back, are none.
        """
        last, self.last = self.last, now
        if last is None or now - last <= self.threshold:
            return 0.0
        self.pauses += 1
        return now - last


class Transition(NamedTuple):
    old: PeerState
    new: PeerState


class Tick(NamedTuple):
    """What the caller should do now: report `transitions` (in order), send a heartbeat
    when `ping` is true, and replace the link when the last transition is to `DEAD`."""

    transitions: list[Transition]
    ping: bool


class Liveness:
    """The liveness of one link at a time (the client's current broker).

    Args:
        interval: seconds of silence before the link is suspect and a heartbeat goes out.
        liveness: intervals of silence before the link is dead.
        now: the time the link was opened.
        state: the state to start in; a first link starts `UP` (nothing was asked yet).
        elsewhere: the client has other brokers to try (no handshake grace, see the rules).

    Raises:
        ValueError: `interval` is not positive or `liveness` is below 2 (a link must be
            suspect, and pinged, before it can be dead).
    """

    def __init__(
        self,
        interval: float = DEFAULT_INTERVAL,
        liveness: int = DEFAULT_LIVENESS,
        *,
        now: float,
        state: PeerState = PeerState.UP,
        elsewhere: bool = False,
    ) -> None:
        if interval <= 0:
            raise ValueError("the heartbeat interval must be positive")
        if liveness < 2:
            raise ValueError("liveness must be at least 2 intervals")
        self.interval = interval
        self.liveness = liveness
        self.state = state
        self.elsewhere = elsewhere
        self.quiet_since = now
        self.opened_at = now  # when the current link was opened (its handshake grace)
        self.ping_in_flight = False
        self.failures = 0  # links declared dead since a broker last answered
        self.pauses = PauseWatch()  # this client's own pauses, seen between ticks

    def _apply(self, event: PeerEvent, out: list[Transition]) -> None:
        new = transition(TRANSITIONS, self.state, event, subject="a link")
        if new is not self.state:
            out.append(Transition(self.state, new))
            self.state = new

    def heard(self, now: float, *, pong: bool = False) -> list[Transition]:
        """A message came from the broker; `pong` when it answers our heartbeat.

        Returns:
            The state change it caused (to `UP`), if any.
        """
        out: list[Transition] = []
        self._apply(PeerEvent.HEARD, out)
        self.quiet_since = now
        self.failures = 0
        if pong:
            self.ping_in_flight = False
        return out

    def tick(self, now: float, *, busy: bool, handshaking: bool = False) -> Tick:
        """Advance the clock; `busy` when calls wait for the broker, `handshaking` when the
        link's transport is connected and its handshake not finished (see the rules).

        A late tick (the loop was held up) may take the link from `UP` to `DEAD` at once;
        both transitions are returned, in order. A tick more than `SELF_PAUSE_S` after
        the previous one means this process itself did not run (see `PauseWatch`): the
        broker's silence is then counted from `now`, so it gets its whole window to speak.
        """
        out: list[Transition] = []
        if self.pauses.turn(now):
            self.quiet_since = max(self.quiet_since, now)
        if not busy or self.state is PeerState.DEAD or (
            handshaking and not self.elsewhere and now - self.opened_at < HANDSHAKE_GRACE_S
        ):
            # Nothing asked (or nothing could be answered yet), nothing owed: silence now
            # is no sign of anything.
            self.quiet_since = now
            return Tick(out, False)
        health = judge(now - self.quiet_since, self.interval, self.interval * self.liveness, reached=True)
        if self.state is PeerState.UP and health is not PeerState.UP:
            self._apply(PeerEvent.QUIET, out)
        if self.state is PeerState.SUSPECT and health is PeerState.DEAD:
            self._apply(PeerEvent.SILENT, out)
            self.failures += 1
            self.ping_in_flight = False  # it went down with the link
            return Tick(out, False)
        ping = self.state is PeerState.SUSPECT and not self.ping_in_flight
        if ping:
            self.ping_in_flight = True
        return Tick(out, ping)

    def dropped(self, *, busy: bool) -> list[Transition]:
        """The transport reports the connection closed; `busy` when calls wait.

        An idle client ignores it (libzmq reconnects by itself, and nothing is owed);
        a busy one's link is dead now, so the caller replaces it without waiting.
        """
        out: list[Transition] = []
        if busy and self.state is not PeerState.DEAD:
            self._apply(PeerEvent.DROPPED, out)
            self.failures += 1
            self.ping_in_flight = False
        return out

    def connected(self, now: float) -> list[Transition]:
        """The caller opened a new link in place of the dead one; it starts `SUSPECT`,
        with its silence counted from `now` and one heartbeat due at the next tick."""
        out: list[Transition] = []
        self._apply(PeerEvent.CONNECTED, out)
        self.quiet_since = self.opened_at = now
        self.ping_in_flight = False
        return out

    def retry_delay(self, endpoints: int, rand: float, *, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP,
                    jitter: float = BACKOFF_JITTER) -> float:
        """Seconds to wait before opening the next link; see `backoff_delay`."""
        return backoff_delay(self.failures, endpoints, rand, base=base, cap=cap, jitter=jitter)


def backoff_delay(
    failures: int,
    endpoints: int,
    rand: float,
    *,
    base: float = BACKOFF_BASE,
    cap: float = BACKOFF_CAP,
    jitter: float = BACKOFF_JITTER,
) -> float:
    """How long to wait before the next connection attempt.

    The first pass through the list is immediate: the next broker is likely alive, and
    every moment waited is a stall the caller sees. Once every endpoint has failed in a
    row, the pause starts at `base` and doubles per failure up to `cap`.

    Args:
        failures: links declared dead in a row (since a broker last answered).
        endpoints: how many brokers the client knows.
        rand: a number in [0, 1) from the caller's random source (the jitter).
        base, cap: the first pause and the largest, in seconds.
        jitter: the pause varies by this fraction either way.

    Returns:
        Seconds to wait; 0 while the list has not been tried through once.
    """
    beyond = failures - endpoints  # failures past the first full pass
    if beyond < 0:
        return 0.0
    pause = min(cap, base * 2.0 ** min(beyond, 32))
    return pause * (1.0 - jitter + 2.0 * jitter * rand)
