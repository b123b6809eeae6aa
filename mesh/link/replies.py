"""Replies to recently finished commands, kept so that a resend gets the same answer.

Shared by the broker (answers it routed) and the node (answers it ran): a resent command
must never run twice, and the cheapest way to make sure is to hand back the first answer.
Sans-IO: time comes in as `now`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

__all__ = ["RecentReplies"]


class RecentReplies:
    """The replies to recently finished commands, so that a resend gets the same answer.

    Bounded three ways, oldest first: at most `max_entries` replies, none older than
    `max_age` seconds, at most `max_bytes` of frames (a reply larger than that is not
    kept). Frames are kept as the same bytes objects, never copied. Time comes in as
    `now`; entries are ordered by when they were stored, so a clock that steps back
    only delays their expiry.
    """

    def __init__(self, max_entries: int, max_age: float, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_age = max_age
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, tuple[float, list[bytes], int]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable, now: float) -> list[bytes] | None:
        """The frames stored for `key`, unless they are older than `max_age`."""
        item = self._items.get(key)
        if item is None or now - item[0] > self.max_age:
            return None
        return item[1]

    def put(self, key: Hashable, frames: list[bytes], now: float) -> None:
        """Remember `frames` for `key` (replacing what was there), then trim to the bounds."""
        items = self._items
        old = items.pop(key, None)
        if old is not None:
            self.bytes -= old[2]
        size = sum(map(len, frames))
        if size > self.max_bytes:
            return
        items[key] = (now, frames, size)
        self.bytes += size
        while len(items) > self.max_entries or self.bytes > self.max_bytes:
            self.bytes -= items.popitem(last=False)[1][2]

    def expire(self, now: float) -> None:
        """Forget the replies older than `max_age`."""
        items = self._items
        limit = now - self.max_age
        while items:
            key, (stored, _, size) = next(iter(items.items()))
            if stored >= limit:
                break
            del items[key]
            self.bytes -= size
