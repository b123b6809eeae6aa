"""Handler nodes for the integration tests, run by real `mesh node testnodes:node` processes."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from mesh.node import Node


def node(name: str = "t", services: list[str] | None = None, capacity: int = 4) -> Node:
    """A node offering the test actions under each of `services`."""
    n = Node(name, capacity=capacity)
    lock = threading.Lock()
    running = {"now": 0, "max": 0}
    runs = {"tally": 0}

    for svc in services or ["alpha"]:

        @n.action(svc, "whoami", schema={"type": "object"}, description="The node's name.")
        def whoami(payload: dict[str, Any]) -> dict[str, Any]:
            return {"node": name}

        @n.action(
            svc,
            "work",
            schema={
                "type": "object",
                "properties": {"sleep": {"type": "number", "minimum": 0}},
                "required": ["sleep"],
                "additionalProperties": False,
            },
            description="Sleep, and report how many commands ran at once on this node.",
        )
        def work(payload: dict[str, Any]) -> dict[str, Any]:
            with lock:
                running["now"] += 1
                running["max"] = max(running["max"], running["now"])
            try:
                time.sleep(payload["sleep"])
            finally:
                with lock:
                    running["now"] -= 1
            return {"node": name, "max_concurrent": running["max"]}

        @n.action(
            svc, "idem", idempotent=True, description="Sleep, then name the node (safe to run again)."
        )
        def idem(payload: dict[str, Any]) -> dict[str, Any]:
            time.sleep(float(payload.get("sleep", 0)))
            return {"node": name}

        @n.action(svc, "tally", description="Sleep, then count this run: how many tally commands ran here.")
        def tally(payload: dict[str, Any]) -> dict[str, Any]:
            time.sleep(float(payload.get("sleep", 0)))
            with lock:
                runs["tally"] += 1
                return {"node": name, "runs": runs["tally"]}

        @n.action(svc, "nap", description="Sleep on the event loop (an async handler).")
        async def nap(payload: dict[str, Any]) -> dict[str, Any]:
            await asyncio.sleep(float(payload.get("sleep", 0)))
            return {"node": name, "slept": payload.get("sleep", 0)}

        @n.action(
            svc,
            "typed",
            schema={
                "type": "object",
                "properties": {"count": {"type": "integer"}, "inner": {"type": "object", "properties": {"flag": {"type": "boolean"}}}},
                "required": ["count"],
            },
        )
        def typed(payload: dict[str, Any]) -> int:
            return payload["count"] * 2

        @n.action(svc, "blob", description="A string of `size` bytes.")
        def blob(payload: dict[str, Any]) -> str:
            return "x" * int(payload["size"])

        @n.action(svc, "announce", description="Publish `value` on `topic` from a (sync) handler.")
        def announce(payload: dict[str, Any]) -> bool:
            n.publish(payload["topic"], payload["value"])
            return True

        @n.action(svc, "boom", description="Always raises.")
        def boom(payload: dict[str, Any]) -> None:
            raise RuntimeError("secret detail that must not leak")

    return n


def broken() -> Node:
    """A node whose start-up always fails, for the launcher's restart tests."""
    raise RuntimeError("this node cannot start")
