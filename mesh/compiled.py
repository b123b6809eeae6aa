"""Which modules of the hot path this installation runs compiled, and the list of them.

A wheel built from source compiles the modules of `HOT_PATH` with mypyc when a C
compiler is there (`setup.py`, `build_backend/mesh_build.py`, docs/performance.md,
"The compiled path"); each keeps its `.py` source beside the extension module, and
Python imports the extension module first. An editable install, a checkout on
`PYTHONPATH`, or a build with `MESH_PURE_PYTHON=1` runs the same modules as Python.
Nothing here imports the modules of `HOT_PATH` unless asked, and the module imports
nothing of mesh, so `setup.py` can read `HOT_PATH` without the package's dependencies.
"""

from __future__ import annotations

import importlib
import importlib.machinery
from typing import Final

__all__ = ["HOT_PATH", "compiled_modules"]

# The typed sans-IO modules a message crosses (docs/performance.md, "The compiled path"):
# header codec and name checks, command states, the broker's routing core, the client's
# protocol core and the node's reply cache. Not `mesh.node.core`: the node loop's link
# subclasses its `BrokerPeer`, and a compiled class cannot have interpreted subclasses.
HOT_PATH: Final = (
    "mesh.protocol.codec",
    "mesh.protocol.names",
    "mesh.protocol.states",
    "mesh.broker.core.broker",
    "mesh.broker.core.commands",
    "mesh.broker.core.nodes",
    "mesh.broker.core.state",
    "mesh.client.core",
    "mesh.link.replies",
)


def compiled_modules() -> list[str]:
    """The modules of `HOT_PATH` that are loaded from a compiled extension module.

    Returns:
        Their names, in `HOT_PATH`'s order: all of them for a compiled wheel, none for
        a pure-Python install (imports each module to find out).
    """
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return [name for name in HOT_PATH if (importlib.import_module(name).__file__ or "").endswith(suffixes)]
