"""Stopping a benchmark's processes after one of them died waiting (Ctrl-C reaches the whole group)."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import pytest

from mesh.bench import common


def test_setting_the_stop_event_does_not_hang_on_a_waiter_that_died(monkeypatch: pytest.MonkeyPatch):
    """Invariant: `set_event` returns within `SET_S` even when a process died inside
    `event.wait()`; a plain `Event.set` waits for that dead waiter to wake, forever, as
    this test shows on the same event (broken once on purpose with `event.set()` in
    place of `set_event`: the call never returned)."""
    ctx = mp.get_context("spawn")
    event = ctx.Event()
    waiter = ctx.Process(target=event.wait, daemon=True)
    waiter.start()
    time.sleep(1.5)  # spawned and asleep inside wait()
    waiter.kill()
    waiter.join()
    plain = threading.Thread(target=event.set, daemon=True)
    plain.start()
    plain.join(1.0)
    hung = plain.is_alive()  # the failure this guards against, shown on the same event
    monkeypatch.setattr(common, "SET_S", 1.0)
    began = time.monotonic()
    common.set_event(event)
    assert time.monotonic() - began < 2.0
    assert hung, "Event.set returned: the waiter was not yet asleep in wait(), so this run showed nothing"
