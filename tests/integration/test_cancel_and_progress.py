"""Cancel and progress end to end with the mesh's own SDKs: client, broker and node processes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from mesh.client import AsyncClient, Client
from mesh.protocol import ErrorCode
from mesh.testing import BrokerProcess, run_node


def wait_for_text(path: Path, text: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text() == text:
            return text
        time.sleep(0.02)
    return path.read_text() if path.exists() else "<missing>"


def test_cancelling_an_async_call_cancels_the_handler_on_the_node(tcp_broker: BrokerProcess, tmp_path: Path) -> None:
    """A cancelled AsyncClient.call sends a cancel; the node's async handler is cancelled."""
    marker = tmp_path / "marker"

    async def scenario() -> None:
        async with AsyncClient(tcp_broker.clients, timeout=10) as client:
            call = asyncio.ensure_future(client.call("slow", "wait", {"seconds": 30, "marker": str(marker)}))
            while not marker.exists():
                await asyncio.sleep(0.02)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            assert await client.call("slow", "steps", {"count": 1}) == {"steps": 1}  # the slot came back

    with run_node("mcpnodes:slow", tcp_broker):
        asyncio.run(scenario())
        assert wait_for_text(marker, "cancelled") == "cancelled"


def test_a_cancel_is_answered_cancelled_to_the_waiting_call(tcp_broker: BrokerProcess, tmp_path: Path) -> None:
    """The broker answers a cancelled command CANCELLED (3009), its one answer."""
    marker = tmp_path / "marker"

    async def scenario() -> None:
        async with AsyncClient(tcp_broker.clients, timeout=10) as client:
            call = asyncio.ensure_future(client.call("slow", "wait", {"seconds": 30, "marker": str(marker)}))
            while not marker.exists():
                await asyncio.sleep(0.02)
            stats = await client.call("mesh", "stats")
            assert stats["in_flight"] == 1
            call.cancel()
            await asyncio.sleep(0.3)
            stats = await client.call("mesh", "stats")
            assert stats["in_flight"] == 0 and stats["counters"]["cancelled"] == 1
            assert stats["counters"][f"error_{int(ErrorCode.CANCELLED)}"] == 1

    with run_node("mcpnodes:slow", tcp_broker):
        asyncio.run(scenario())


def test_progress_reports_reach_the_calls_hook_in_order(tcp_broker: BrokerProcess) -> None:
    """report_progress in a handler arrives at Client.call's on_progress, in order, before the result."""
    seen: list[tuple[float, float | None, str | None]] = []
    with run_node("mcpnodes:slow", tcp_broker), Client(tcp_broker.clients, timeout=10) as client:
        result = client.call("slow", "steps", {"count": 4}, on_progress=lambda *report: seen.append(report))
    assert result == {"steps": 4}
    assert seen == [(float(i), 4.0, f"step {i}") for i in range(1, 5)]
