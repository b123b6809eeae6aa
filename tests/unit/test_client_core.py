"""The client's sans-IO decisions (mesh/client/core.py), walked with plain numbers for `now`."""

from __future__ import annotations

import pytest

from mesh.client.core import (
    AUTO_RETRY,
    RETRY_PAUSE,
    Endpoints,
    Rejoin,
    Retry,
    merge_services_page,
    reachable,
)
from mesh.protocol import NEVER_STARTED, BadFormatError, ConfigurationError, ErrorCode

NOT_FOUND = ErrorCode.HANDLER_NOT_FOUND


def pauses(retry: Retry, code: ErrorCode, now: float = 0.0, *, rejoining: bool = False) -> list[float]:
    """Fail every attempt with `code` at `now`, until the retry gives up: the pauses taken."""
    out: list[float] = []
    while (pause := retry.pause_after(code, now, rejoining=rejoining)) is not None:
        out.append(pause)
    return out


@pytest.mark.parametrize("code", sorted(NEVER_STARTED))
def test_a_never_started_code_is_retried_with_doubling_pauses_up_to_the_retries(code):
    """A code that proves the command never ran is resent `retries` times, pausing
    RETRY_PAUSE, then twice that, then twice again (broken once on purpose: a pause that
    did not double, and a retry count off by one, each failed this test)."""
    assert AUTO_RETRY == NEVER_STARTED
    assert pauses(Retry(3, deadline=100.0), code) == [RETRY_PAUSE, 2 * RETRY_PAUSE, 4 * RETRY_PAUSE]
    assert pauses(Retry(0, deadline=100.0), code) == []


@pytest.mark.parametrize("code", [ErrorCode.NODE_LOST, ErrorCode.DEADLINE_EXCEEDED, ErrorCode.ACCESS_DENIED, NOT_FOUND])
def test_a_code_that_may_have_run_is_never_retried(code):
    """NODE_LOST or DEADLINE_EXCEEDED may come after the command ran: resending could run
    it twice, so the client gives up at once however many retries are allowed (broken once
    on purpose by retrying every code: this test failed)."""
    assert code not in AUTO_RETRY
    assert Retry(5, deadline=100.0).pause_after(code, 0.0, rejoining=False) is None


def test_no_pause_reaches_the_deadline():
    """A pause that would use up the rest of the budget is not taken: the error is raised
    while the caller still has time (broken once on purpose by comparing with `<`
    instead of `<=`: the exact-boundary case below failed)."""
    retry = Retry(10, deadline=2 * RETRY_PAUSE)
    assert retry.pause_after(ErrorCode.UNAVAILABLE, 0.0, rejoining=False) == RETRY_PAUSE
    # The next pause is 2 * RETRY_PAUSE; exactly that much left is not enough.
    assert retry.pause_after(ErrorCode.UNAVAILABLE, 0.0, rejoining=False) is None
    # Nor does a rejoining broker buy time past the deadline.
    late = Retry(10, deadline=1.0)
    assert late.pause_after(NOT_FOUND, 1.0, rejoining=True) is None


def test_handler_not_found_waits_for_rejoining_nodes_without_using_a_retry():
    """While the broker is new to the client, HANDLER_NOT_FOUND pauses RETRY_PAUSE and
    tries again, as often as the deadline allows and without spending the retries or
    doubling the pause; afterwards it fails at once (broken once on purpose by counting
    these waits as retries: the count below failed)."""
    retry = Retry(1, deadline=1.0)
    waits = [retry.pause_after(NOT_FOUND, now / 100, rejoining=True) for now in range(20)]
    assert waits == [RETRY_PAUSE] * 20
    # The one retry is still there, and its pause is the first one, not doubled.
    assert retry.pause_after(ErrorCode.UNAVAILABLE, 0.5, rejoining=False) == RETRY_PAUSE
    assert retry.pause_after(ErrorCode.UNAVAILABLE, 0.5, rejoining=False) is None
    assert Retry(3, deadline=1.0).pause_after(NOT_FOUND, 0.0, rejoining=False) is None


def test_a_call_refused_for_its_own_wait_is_resent_once_at_once():
    """Invariant: a call the broker refused REPLAY_DETECTED (its stamp aged while it waited in a
    queue, before anything ran) is resent at once, freshly stamped, even with no retries
    left; a second refusal is raised (a clock really off), and the retries stay whole
    (broken once on purpose by counting the resend as a retry: the UNAVAILABLE pause failed)."""
    replay = ErrorCode.REPLAY_DETECTED
    assert replay not in AUTO_RETRY
    assert pauses(Retry(0, deadline=100.0), replay) == [0.0]
    retry = Retry(1, deadline=100.0)
    assert retry.pause_after(replay, 0.0, rejoining=False) == 0.0
    assert retry.pause_after(ErrorCode.UNAVAILABLE, 0.0, rejoining=False) == RETRY_PAUSE
    assert retry.pause_after(replay, 0.0, rejoining=False) is None


def test_nodes_count_as_rejoining_for_one_window_after_each_move():
    """HANDLER_NOT_FOUND is forgiven only within `window` of the last move to another
    broker (or instance), never before the first one (broken once on purpose with `<=`
    for `<`: the boundary case failed)."""
    rejoin = Rejoin(window=3.0)
    assert not rejoin.rejoining(0.0)  # the first broker is no move
    rejoin.moved(10.0)
    assert rejoin.rejoining(10.0) and rejoin.rejoining(12.99)
    assert not rejoin.rejoining(13.0)
    rejoin.moved(20.0)
    assert rejoin.rejoining(22.0)


def test_a_new_instance_id_is_a_restart_the_first_is_not():
    """The first pong names the broker's instance; only a different one later means it
    restarted (broken once on purpose by reporting the first one too: this test failed)."""
    rejoin = Rejoin(window=3.0)
    assert rejoin.seen("a") is False
    assert rejoin.seen("a") is False
    assert rejoin.seen("b") is True
    assert rejoin.seen("b") is False


def test_failover_goes_round_robin_and_back_to_the_same_single_endpoint():
    """Each failover moves to the next endpoint in order, wrapping around; with one
    endpoint it is that one again (a new socket reaches a restarted broker)."""
    ends = Endpoints(["tcp://a:1", "tcp://b:1", "tcp://c:1"])
    assert ends.current == "tcp://a:1"
    assert [ends.advance() for _ in range(4)] == ["tcp://b:1", "tcp://c:1", "tcp://a:1", "tcp://b:1"]
    one = Endpoints("tcp://a:1")
    assert one.all == ("tcp://a:1",) and one.advance() == "tcp://a:1"


def test_no_endpoint_is_a_configuration_error():
    """A client with nothing to connect to fails at once with a stable code."""
    with pytest.raises(ConfigurationError) as info:
        Endpoints([])
    assert info.value.code == ErrorCode.CONFIGURATION


@pytest.mark.parametrize(
    ("advertised", "via", "expected"),
    [
        ("tcp://0.0.0.0:5557", "tcp://10.0.0.2:5555", "tcp://10.0.0.2:5557"),
        ("tcp://*:5557", "tcp://broker.lan:5555", "tcp://broker.lan:5557"),
        ("tcp://10.0.0.9:5557", "tcp://10.0.0.2:5555", "tcp://10.0.0.9:5557"),
        ("ipc:///tmp/ev", "tcp://10.0.0.2:5555", "ipc:///tmp/ev"),
    ],
)
def test_a_wildcard_event_endpoint_is_reached_at_the_brokers_address(advertised, via, expected):
    """A broker bound to every address is reached at the host the client already uses."""
    assert reachable(advertised, via) == expected


def test_registry_pages_merge_and_must_move_forward():
    """`services()` folds pages into one registry and stops at next=None; a next that does
    not move forward (a broker answering the same page again) is BAD_FORMAT, never an
    endless read (broken once on purpose by dropping the forward check: this test failed)."""
    registry: dict = {}
    page1 = {"services": {"a": {"nodes": 1, "actions": {"x": {}}}}, "next": "a"}
    page2 = {"services": {"a": {"nodes": 2, "actions": {"y": {}}}, "b": {"nodes": 1, "actions": {}}}, "next": None}
    assert merge_services_page(registry, None, page1) == "a"
    assert merge_services_page(registry, "a", page2) is None
    assert registry == {"a": {"nodes": 2, "actions": {"x": {}, "y": {}}}, "b": {"nodes": 1, "actions": {}}}
    for after, page in [("a", page1), ("b", page1), (None, {"services": {}, "next": 7}), (None, {"next": None}), (None, [])]:
        with pytest.raises(BadFormatError) as info:
            merge_services_page({}, after, page)
        assert info.value.code == ErrorCode.BAD_FORMAT
