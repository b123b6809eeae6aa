"""A cancelled AsyncSubscription stops, even when its socket signals in the same turn."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import zmq

from mesh.subscription import AsyncSubscription


def test_cancelling_get_as_the_socket_wakes_it_still_cancels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Invariant: `get()` cancelled raises CancelledError, whatever else completed in that turn.

    The wake-up of the socket's descriptor and the cancel are made to land in one turn of
    the loop, deterministically: the test fires the reader callback itself, then cancels.
    Built on `asyncio.wait_for`, Python 3.11 returned normally there and the subscriber
    went on reading forever, so `mesh mcp` never exited after its client left.
    """
    ctx = zmq.Context()

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        readers: list[Any] = []
        real_add_reader = loop.add_reader
        monkeypatch.setattr(loop, "add_reader", lambda fd, cb: (readers.append(cb), real_add_reader(fd, cb)))

        async def replay(_request: dict[str, Any]) -> Any:
            raise AssertionError("no replay asked for")

        sub = AsyncSubscription("tcp://127.0.0.1:9", "", None, ctx=ctx, hwm=10, replay=replay)
        try:
            task = loop.create_task(sub.get())
            for _ in range(3):
                await asyncio.sleep(0)
            assert readers, "get() should be waiting on the socket's descriptor"
            readers[-1]()  # the descriptor signals...
            task.cancel()  # ...and the cancel arrives in the same turn
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 5)
        finally:
            await sub.close()

    try:
        asyncio.run(scenario())
    finally:
        ctx.destroy(linger=0)
