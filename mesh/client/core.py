"""The client's decisions, sans-IO: which failed calls to resend and after how long, which
broker to move to, when a moved-to broker's nodes may still be rejoining, and how the
registry's pages add up.

No zmq, no asyncio, no clock: time comes in as `now` (the caller's clock, the same one
for every method of one object), so tests walk each rule with plain numbers. `aio.py` is
the loop that acts on these answers.

Rules:

* Errors that prove the command never started (`AUTO_RETRY`: `RESOURCE_EXHAUSTED`,
  `UNAVAILABLE`) are retried with the same command id after a short, growing pause
  (`RETRY_PAUSE`, doubling), at most `retries` times, and never once the pause would
  reach the call's deadline. Other retryable errors (`NODE_LOST`, `DEADLINE_EXCEEDED`)
  may come after the command ran, so only the caller, who knows whether it is safe,
  retries them.
* A call is stamped (and sealed) when it is handed to the socket, but it may wait
  there, or in the broker's queue, past the broker's replay window (10 s): queued
  while its socket connects, or while a broker restarts under thousands of clients.
  The broker then refuses it `REPLAY_DETECTED` before anything runs, so the first
  such refusal of a call is resent at once with a fresh stamp and the same id (not
  counted as a retry); a second one is raised (a clock really off by more than the
  window, which resending cannot mend).
* A broker the client just moved to (failover, or a restart seen by its instance id)
  may not know its nodes yet: they register with it within a heartbeat. For one
  liveness window after the move, `HANDLER_NOT_FOUND` is retried after `RETRY_PAUSE`
  (same id, within the deadline, not counted as a retry) instead of failing the call.
* Failover goes round robin through the endpoints (the same one again when there is
  one: a new socket is what reaches a restarted broker); how long to wait before each
  attempt is `Liveness.retry_delay` (liveness.py).
* The registry is read page by page; each page's `next` must move forward, so a broker
  that answers the same page again fails the read (`BAD_FORMAT`) instead of looping it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import urlsplit

from ..protocol import NEVER_STARTED, BadFormatError, ConfigurationError, ErrorCode

__all__ = [
    "AUTO_RETRY",
    "DEFAULT_TIMEOUT",
    "GRACE",
    "RETRY_PAUSE",
    "SWEEP_S",
    "Endpoints",
    "Rejoin",
    "Retry",
    "merge_services_page",
    "reachable",
]

DEFAULT_TIMEOUT: Final = 30.0
RETRY_PAUSE: Final = 0.05
# The broker answers at the deadline; wait this much longer before giving up on it.
GRACE: Final = 0.5
SWEEP_S: Final = 0.1
# The codes that prove a command never started, so resending it cannot run it twice.
AUTO_RETRY: Final = NEVER_STARTED


class Retry:
    """One call's retry budget: after each failed attempt, pause and resend, or give up.

    Args:
        retries: automatic retries allowed (of the errors in `AUTO_RETRY`).
        deadline: the call's deadline, on the clock `now` is given in.
    """

    def __init__(self, retries: int, deadline: float) -> None:
        self.deadline = deadline
        self._attempts = 1 + retries
        self._attempt = 0
        self._pause = RETRY_PAUSE
        self._restamped = False

    def pause_after(self, code: int, now: float, *, rejoining: bool) -> float | None:
        """What to do after an attempt failed with `code` at `now`.

        Args:
            code: the error's code (an `ErrorCode`).
            now: the current time, on the deadline's clock.
            rejoining: whether the broker is new to this client (see `Rejoin`).

        Returns:
            Seconds to pause before resending with the same command id, or None: give
            up and raise the error.
        """
        if self.deadline - now <= self._pause:
            return None  # the pause would use up what is left of the budget
        if code == ErrorCode.HANDLER_NOT_FOUND and rejoining:
            return RETRY_PAUSE  # the nodes register with a new broker within a heartbeat
        if code == ErrorCode.REPLAY_DETECTED and not self._restamped:
            self._restamped = True
            return 0.0  # refused for its own wait, before it ran: resend it freshly stamped
        self._attempt += 1
        if code not in AUTO_RETRY or self._attempt >= self._attempts:
            return None
        pause = self._pause
        self._pause *= 2
        return pause


class Rejoin:
    """When the client's broker changed (failover, or a restart seen by its instance id),
    so `HANDLER_NOT_FOUND` may only mean its nodes have not registered with it yet.

    Args:
        window: how long after a change nodes may still be rejoining (one liveness
            window: heartbeat interval times liveness), on the clock `now` is given in.
    """

    def __init__(self, window: float) -> None:
        self.window = window
        self.changed_at = -math.inf
        self.instance: str | None = None  # the broker's start id, from its pongs

    def moved(self, now: float) -> None:
        """The client now talks to another broker (or another instance of it)."""
        self.changed_at = now

    def rejoining(self, now: float) -> bool:
        """Whether the broker became this client's within the window before `now`."""
        return now - self.changed_at < self.window

    def seen(self, instance: str) -> bool:
        """Record the instance id a pong named; True when it differs from the one known
        before (the broker restarted, and what the old one held is gone)."""
        restarted = self.instance is not None and instance != self.instance
        self.instance = instance
        return restarted


class Endpoints:
    """The brokers to fail over between, in order, and which one the client uses now.

    Args:
        brokers: one endpoint, or a list of them.

    Raises:
        ConfigurationError: no endpoint at all.
    """

    def __init__(self, brokers: str | Sequence[str]) -> None:
        self.all: tuple[str, ...] = (brokers,) if isinstance(brokers, str) else tuple(brokers)
        if not self.all:
            raise ConfigurationError("a client needs at least one broker endpoint")
        self.index = 0

    @property
    def current(self) -> str:
        """The endpoint to connect to now."""
        return self.all[self.index]

    def advance(self) -> str:
        """Move to the next endpoint, round robin, and return it."""
        self.index = (self.index + 1) % len(self.all)
        return self.current


def reachable(advertised: str, via: str) -> str:
    """The broker's advertised endpoint, with a wildcard host replaced by the one in `via`.

    A broker bound to `tcp://0.0.0.0:5557` is reached at the address its clients use.

    Args:
        advertised: the endpoint the broker names (its event endpoint).
        via: the endpoint the client reached the broker at.

    Returns:
        `advertised`, with the host of `via` when `advertised` binds every address.
    """
    adv = urlsplit(advertised)
    if adv.scheme == "tcp" and adv.hostname in ("0.0.0.0", "::", "*"):
        host = urlsplit(via).hostname
        if host:
            return f"tcp://{host}:{adv.port}"
    return advertised


def merge_services_page(registry: dict[str, Any], after: str | None, page: Any) -> str | None:
    """Fold one `mesh.services` page into `registry`; the pages of one read must move
    forward, so a broker that answers the same page again cannot loop the client.

    Args:
        registry: service -> {"nodes", "actions"}, merged into in place.
        after: the `after` the page was asked with (None for the first page).
        page: the page as the broker answered it.

    Returns:
        The `after` to ask the next page with, or None when this was the last page.

    Raises:
        BadFormatError: a page that is not {services, next}, or a next that does not move forward.
    """
    try:
        for service, entry in page["services"].items():
            merged = registry.setdefault(service, {"nodes": entry["nodes"], "actions": {}})
            merged["nodes"] = entry["nodes"]
            merged["actions"].update(entry["actions"])
        following = page["next"]
    except (KeyError, TypeError, AttributeError):
        raise BadFormatError("a mesh.services page is not {services, next}") from None
    if following is None:
        return None
    if not isinstance(following, str) or (after is not None and following <= after):
        raise BadFormatError("a mesh.services page's next does not move forward")
    return following
