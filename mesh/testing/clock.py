"""A fake clock for the sans-IO cores, which take time as a `now` argument and never read it."""

from __future__ import annotations

__all__ = ["FakeClock"]


class FakeClock:
    """A clock for sans-IO cores: time moves only when the test says so."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now
