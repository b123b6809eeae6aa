"""Handler nodes for the MCP bridge tests, run by real `mesh node mcpnodes:...` processes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from mesh.node import Node, report_progress


def slow() -> Node:
    """A node whose commands take time: one records its cancellation, one reports progress."""
    n = Node("slow", capacity=4)

    @n.action(
        "slow",
        "wait",
        schema={
            "type": "object",
            "properties": {"seconds": {"type": "number", "minimum": 0}, "marker": {"type": "string"}},
            "required": ["seconds", "marker"],
        },
    )
    async def wait(payload: dict[str, Any]) -> dict[str, Any]:
        """Wait, writing `started` to the marker file, then `cancelled` if the caller cancels."""
        marker = Path(payload["marker"])
        marker.write_text("started")
        try:
            await asyncio.sleep(payload["seconds"])
        except asyncio.CancelledError:
            marker.write_text("cancelled")
            raise
        marker.write_text("finished")
        return {"waited": payload["seconds"]}

    @n.action(
        "slow",
        "steps",
        schema={"type": "object", "properties": {"count": {"type": "integer", "minimum": 1}}, "required": ["count"]},
    )
    async def steps(payload: dict[str, Any]) -> dict[str, Any]:
        """Take `count` short steps, reporting progress after each."""
        for i in range(payload["count"]):
            await asyncio.sleep(0.02)
            report_progress(i + 1, payload["count"], f"step {i + 1}")
        return {"steps": payload["count"]}

    return n


def late() -> Node:
    """A node that joins in the middle of a session."""
    n = Node("late", capacity=2)

    @n.action("late", "hello", schema={"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]})
    async def hello(payload: dict[str, Any]) -> dict[str, Any]:
        """Greet `name`."""
        return {"greeting": f"hello {payload['name']}"}

    return n


def secret() -> Node:
    """A service the bridge's role may not call."""
    n = Node("secret", capacity=2)

    @n.action("secret", "reveal", schema={"type": "object"})
    async def reveal(payload: dict[str, Any]) -> dict[str, Any]:
        """What the bridge must never reach."""
        return {"secret": 42}

    return n


CLASH_LONG_SERVICE = "clash" + "l" * 59  # 64 characters, the longest service name
CLASH_LONG_ACTIONS = ("a" * 64, "a" * 63 + "b")  # 129-character mesh names, alike for 64 once `.` is `_`
CLASH_NAMES = ("clash_x.y", "clash.x_y", "clash.x-y", "clash-x.y") + tuple(
    f"{CLASH_LONG_SERVICE}.{a}" for a in CLASH_LONG_ACTIONS
)  # every one of these collides with another under the naive `.` -> `_` mapping


def clash() -> Node:
    """Actions whose mesh names collide as tool names (`clash_x.y` and `clash.x_y`, ...), or pass 64 characters.

    Each answers with its own mesh name, so a test can tell which one a tool name reached.
    """
    n = Node("clash", capacity=2)
    for mesh_name in CLASH_NAMES:
        service, action = mesh_name.split(".")

        async def which(payload: dict[str, Any], mesh_name: str = mesh_name) -> dict[str, Any]:
            return {"mesh_name": mesh_name}

        n.action(service, action, schema={"type": "object"}, description=f"Answer {mesh_name}.")(which)
    return n


async def wait_for_file(path: Path, content: str, timeout: float = 5.0) -> str:
    """The marker file's text once it equals `content` (or whatever it holds at the timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text() == content:
            return content
        await asyncio.sleep(0.02)
    return path.read_text() if path.exists() else "<missing>"
