"""What a node leaves behind per command: nothing for the garbage collector (docs/performance.md, "The tail")."""

from __future__ import annotations

import asyncio
import gc
import threading
from typing import Any

import pytest

from mesh.client import Client
from mesh.node import Node
from mesh.node.core import Work

CALLS = 200


def _node() -> Node:
    n = Node("garbage")

    @n.action("g", "now", description="Answer without waiting (as echo does).")
    async def now(payload: dict[str, Any]) -> dict[str, Any]:
        return payload

    @n.action("g", "later", description="Wait on the loop twice, then answer.")
    async def later(payload: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0)
        await asyncio.sleep(0.001)
        return payload

    return n


@pytest.mark.parametrize("action", ["now", "later"])
def test_commands_answered_by_an_async_handler_leave_no_reference_cycle(tcp_broker, action):
    """Invariant: once answered, a command run by an `async` handler, whether it waited or
    not, is freed by reference counting alone; no `Work` of it is ever found by the collector
    as unreachable garbage. (A cycle per command makes young collections long pauses: the tail.)"""
    node = _node()
    serving = threading.Thread(target=node.run, args=(tcp_broker.nodes,), daemon=True)
    serving.start()
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # keep what the collector finds unreachable, to look at it
    try:
        assert node.registered.wait(15)
        with Client(tcp_broker.clients, timeout=10.0) as client:
            for i in range(CALLS):
                assert client.call("g", action, {"i": i}) == {"i": i}
        gc.collect()
        left = [o for o in gc.garbage if isinstance(o, Work)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        node.stop()
        serving.join(15)
    assert left == [], f"{len(left)} of {CALLS} commands were left in reference cycles"
    assert not serving.is_alive()
