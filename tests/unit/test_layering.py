"""What importing a sans-IO core loads: never ZeroMQ, and never another role.

Each check runs in a fresh interpreter, since this test process has loaded everything.
"""

from __future__ import annotations

import subprocess
import sys

import pytest


def _loaded_after(module: str) -> set[str]:
    """The top-level modules (and `mesh.*` modules) a fresh interpreter holds after importing `module`."""
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(out.split())


@pytest.mark.parametrize("module", ["mesh.broker", "mesh.broker.core", "mesh.link.replies", "mesh.link.health",
                                    "mesh.link.heartbeat", "mesh.protocol.registration", "mesh.client.core"])
def test_sans_io_cores_load_no_zmq(module: str) -> None:
    """Importing the broker's routing core, the client's decisions (or a shared link piece)
    loads no zmq: only `mesh.broker.loop` and `mesh.client.aio` own sockets, so the core
    runs anywhere a test or simulation does."""
    loaded = _loaded_after(module)
    assert not {m for m in loaded if m == "zmq" or m.startswith("zmq.")}


def test_shared_link_pieces_load_no_role() -> None:
    """`mesh.link` is shared by every role, so it imports none of them (a node or client
    using the reply cache does not pull in the broker)."""
    loaded = _loaded_after("mesh.link.replies")
    roles = ("mesh.broker", "mesh.node", "mesh.client", "mesh.cluster")
    assert not {m for m in loaded if m.startswith(roles)}
