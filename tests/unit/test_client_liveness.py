"""The client's view of its broker, up -> suspect -> dead, driven by a fake clock (no sockets)."""

from __future__ import annotations

import pytest

from mesh.link.health import TRANSITIONS, PeerEvent, PeerState
from mesh.liveness import (
    HANDSHAKE_GRACE_S,
    Liveness,
    PauseWatch,
    Transition,
    backoff_delay,
)
from mesh.protocol import InvalidStateError
from mesh.testing import FakeClock

UP, SUSPECT, DEAD = PeerState.UP, PeerState.SUSPECT, PeerState.DEAD


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(clock: FakeClock, state: PeerState = UP) -> Liveness:
    return Liveness(1.0, 3, now=clock.now, state=state)


def ticks(lv: Liveness, clock: FakeClock, seconds: float, *, busy: bool = True) -> tuple[list[Transition], bool]:
    """Tick every 1/8 s (exact in binary) for `seconds`, as the client's sweep does (every
    0.1 s): every transition, and whether any tick asked for a ping."""
    out: list[Transition] = []
    ping = False
    for _ in range(round(seconds * 8)):
        tick = lv.tick(clock.advance(0.125), busy=busy)
        out += tick.transitions
        ping = ping or tick.ping
    return out, ping


def test_silence_while_busy_goes_suspect_then_dead(clock):
    """One interval of silence: suspect and one ping; three: dead."""
    lv = make(clock)
    assert lv.tick(clock.advance(0.9), busy=True) == ([], False)
    assert lv.tick(clock.advance(0.1), busy=True) == ([Transition(UP, SUSPECT)], True)
    assert lv.tick(clock.advance(1.0), busy=True) == ([], False)
    assert lv.tick(clock.advance(0.99), busy=True) == ([], False)
    assert lv.tick(clock.advance(0.01), busy=True) == ([Transition(SUSPECT, DEAD)], False)
    assert lv.state is DEAD and lv.failures == 1


def test_an_idle_client_never_pings_and_never_declares_the_broker_dead(clock):
    """Silence while nothing waits is no sign: no ping, no transition, however long."""
    lv = make(clock)
    for _ in range(100):
        assert lv.tick(clock.advance(1.0), busy=False) == ([], False)
    assert lv.state is UP
    # The silence of a call starts when the call does, not at the last reply before the idle time.
    assert lv.tick(clock.advance(0.5), busy=True) == ([], False)


def test_a_link_in_its_handshake_is_not_silent_until_the_grace_ends(clock):
    """Invariant: while the transport is connected and its handshake unfinished, the broker
    has been asked nothing yet: no suspicion, no ping, no failover (which would only start
    the handshake again), and the window counts from the handshake's end; past
    HANDSHAKE_GRACE_S from the link's opening the silence counts again (broken once on
    purpose by ignoring `handshaking`: the first assertion failed at 1 s)."""
    lv = make(clock)
    out, ping, opened = [], False, clock.now
    while clock.now - opened < HANDSHAKE_GRACE_S - 1:
        tick = lv.tick(clock.advance(0.125), busy=True, handshaking=True)
        out, ping = out + tick.transitions, ping or tick.ping
    assert (out, ping, lv.state) == ([], False, UP)
    assert ticks(lv, clock, 0.875) == ([], False)  # handshake done: a fresh window starts
    assert ticks(lv, clock, 0.125) == ([Transition(UP, SUSPECT)], True)
    # A link that stays in its handshake past the grace is silent like any other.
    late = Liveness(1.0, 3, now=clock.now)
    clock.advance(HANDSHAKE_GRACE_S)
    assert late.tick(clock.advance(0.125), busy=True, handshaking=True).transitions == [
        Transition(UP, SUSPECT), Transition(SUSPECT, DEAD)]


def test_a_client_with_other_brokers_gives_a_link_in_its_handshake_no_grace(clock):
    """Invariant: with another broker to try, a link whose handshake never ends (a broker
    paused or frozen while its kernel still accepts connections) is dead after the usual
    window, so waiting calls move on instead of waiting out HANDSHAKE_GRACE_S (the fault
    suite's pause-quorum schedule stalled clients 18 s on a paused broker this way; broken
    once on purpose by ignoring `elsewhere`: no transition came within the window)."""
    lv = Liveness(1.0, 3, now=clock.now, elsewhere=True)
    out, ping = [], False
    for _ in range(3 * 8):
        tick = lv.tick(clock.advance(0.125), busy=True, handshaking=True)
        out, ping = out + tick.transitions, ping or tick.ping
    assert (out, ping, lv.state) == ([Transition(UP, SUSPECT), Transition(SUSPECT, DEAD)], True, DEAD)


def test_any_message_resets_the_silence(clock):
    """Replies keep the link up without a single heartbeat."""
    lv = make(clock)
    for _ in range(10):
        clock.advance(0.9)
        assert lv.heard(clock.now) == []
        assert lv.tick(clock.now, busy=True) == ([], False)
    assert lv.state is UP


def test_at_most_one_heartbeat_is_in_flight(clock):
    """Suspect again after other traffic, the unanswered ping is not followed by a second."""
    lv = make(clock)
    assert lv.tick(clock.advance(1.0), busy=True).ping
    assert lv.heard(clock.advance(0.1)) == [Transition(SUSPECT, UP)]  # not the pong
    assert ticks(lv, clock, 1.0) == ([Transition(UP, SUSPECT)], False)
    assert lv.heard(clock.advance(0.1), pong=True) == [Transition(SUSPECT, UP)]
    assert ticks(lv, clock, 1.0) == ([Transition(UP, SUSPECT)], True)


def test_a_late_tick_reports_both_transitions_in_order(clock):
    """A loop held up for long goes up -> suspect -> dead in one tick."""
    lv = make(clock)
    assert lv.tick(clock.advance(10), busy=True) == ([Transition(UP, SUSPECT), Transition(SUSPECT, DEAD)], False)


def test_a_new_link_is_suspect_and_pinged_at_once(clock):
    """After connected() the first tick sends a heartbeat; silence then counts from the connection."""
    lv = make(clock)
    lv.tick(clock.advance(3.0), busy=True)
    assert lv.state is DEAD
    clock.advance(5.0)  # backing off: no clock runs against a link that is not there
    assert lv.tick(clock.now, busy=True) == ([], False)
    assert lv.connected(clock.now) == [Transition(DEAD, SUSPECT)]
    assert lv.tick(clock.now, busy=True) == ([], True)
    assert ticks(lv, clock, 2.875) == ([], False)
    assert lv.tick(clock.advance(0.125), busy=True) == ([Transition(SUSPECT, DEAD)], False)
    assert lv.failures == 2
    lv.connected(clock.now)
    assert lv.heard(clock.advance(0.01), pong=True) == [Transition(SUSPECT, UP)]
    assert lv.failures == 0


def test_every_transition_of_the_table(clock):
    """Each entry of TRANSITIONS is reachable by its event, and each missing pair raises."""
    events = {
        PeerEvent.HEARD: lambda lv: lv.heard(clock.now),
        PeerEvent.CONNECTED: lambda lv: lv.connected(clock.now),
        PeerEvent.DROPPED: lambda lv: lv.dropped(busy=True),
    }
    for (state, event), new in TRANSITIONS.items():
        lv = make(clock, state)
        if event in events:
            events[event](lv)
        else:
            lv.tick(clock.now + (1.0 if event is PeerEvent.QUIET else 3.0), busy=True)
        assert lv.state is new, (state, event)
    for state in PeerState:
        for event in (PeerEvent.HEARD, PeerEvent.CONNECTED):  # DROPPED when dead is ignored, below
            if (state, event) not in TRANSITIONS:
                with pytest.raises(InvalidStateError):
                    events[event](make(clock, state))


def test_settings_that_cannot_work_are_refused(clock):
    """A link must be suspect (and pinged) before it is dead, and intervals are positive."""
    with pytest.raises(ValueError):
        Liveness(1.0, 1, now=clock.now)
    with pytest.raises(ValueError):
        Liveness(0.0, 3, now=clock.now)


@pytest.mark.parametrize(
    ("failures", "endpoints", "rand", "expected"),
    [
        (1, 2, 0.5, 0.0),  # the other broker is tried at once
        (2, 2, 0.5, 0.1),  # both failed: back off
        (3, 2, 0.5, 0.2),
        (6, 2, 0.5, 1.6),
        (7, 2, 0.5, 2.0),  # capped
        (50, 2, 0.5, 2.0),
        (1, 1, 0.5, 0.1),  # one broker: its own restart is awaited with a pause
        (50, 1, 0.0, 1.6),  # jitter -20 %
        (50, 1, 0.9999999, 2.4),  # jitter +20 %
    ],
)
def test_backoff_is_immediate_for_the_first_pass_then_doubles_capped_with_jitter(failures, endpoints, rand, expected):
    """The pause between attempts once the whole list failed: 0.1 s doubling to 2 s, +-20 %."""
    assert backoff_delay(failures, endpoints, rand) == pytest.approx(expected, abs=1e-6)


def test_a_dropped_connection_is_dead_at_once_only_while_calls_wait(clock):
    """The transport's close kills a busy link without a window; an idle one ignores it."""
    lv = make(clock, UP)
    assert lv.dropped(busy=False) == [] and lv.state is UP
    assert lv.dropped(busy=True) == [Transition(UP, DEAD)]
    assert lv.failures == 1
    assert lv.dropped(busy=True) == []  # already dead: nothing more to report


def test_a_client_that_was_paused_gives_its_broker_a_whole_window(clock):
    """Invariant: the client's own pause (a gap over SELF_PAUSE_S between ticks) is not the
    broker's silence: the broker is declared dead only after a whole window from the resume,
    and still is then if it stays silent."""
    lv = make(clock)
    assert ticks(lv, clock, 0.5) == ([], False)
    assert lv.tick(clock.advance(20.0), busy=True) == ([], False)  # SIGSTOP ... SIGCONT
    assert lv.state is UP and lv.pauses.pauses == 1
    assert ticks(lv, clock, 1.0) == ([Transition(UP, SUSPECT)], True)
    assert ticks(lv, clock, 1.875) == ([], False)
    assert lv.tick(clock.advance(0.125), busy=True) == ([Transition(SUSPECT, DEAD)], False)


def test_pause_watch_tells_a_pause_from_a_late_turn():
    """Invariant: only a gap longer than the threshold between consecutive turns is a pause;
    the first turn and a clock that goes back are not."""
    watch = PauseWatch(1.0)
    assert watch.turn(100.0) == 0.0
    assert watch.turn(101.0) == 0.0  # exactly the threshold: a late turn
    assert watch.turn(103.5) == 2.5
    assert watch.turn(103.0) == 0.0  # went back
    assert watch.pauses == 1
