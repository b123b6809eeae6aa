"""An idle broker sleeps until its next tick (an in-process `BrokerServer` on real sockets)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import zmq

from mesh.broker.loop import TICK_S, BrokerServer, Endpoints

IDLE_S = 2.0


def test_an_idle_broker_waits_for_each_tick_in_one_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """Invariant: with nothing to read, the loop makes about one poll per tick.

    The wait is given to `zmq_poll` in whole milliseconds; rounded down, it was 0 for the
    last millisecond before every tick, and the loop spun through polls that return at
    once there (hundreds a second idle, 0.4 empty turns per message under load).
    """
    polls: list[Any] = []

    class Counting(zmq.Poller):
        def poll(self, timeout: Any = None) -> Any:
            polls.append(timeout)
            return super().poll(timeout)

    monkeypatch.setattr(zmq, "Poller", Counting)  # the loop makes its poller when it runs
    server = BrokerServer(Endpoints("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "tcp://127.0.0.1:*"), drain_timeout=1.0)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    time.sleep(IDLE_S)
    counted = len(polls)
    server.stop()
    thread.join(15)
    assert not thread.is_alive()
    ticks = IDLE_S / TICK_S
    assert counted <= 2 * ticks + 5, f"{counted} polls in {IDLE_S} s idle, {ticks:.0f} ticks"
    assert counted >= ticks / 2  # it did run its ticks
