"""The `mesh` command: each subcommand parses, calls the library, prints.

The group `main`, the exit codes and what the subcommands share live in `base`; each
command group is its own module, which registers its commands on `main` when imported here.
"""

from . import bench, broker, calls, mcp, node, ops, security  # noqa: F401  (importing registers their commands)
from .base import JsonLogFormatter, main

__all__ = ["JsonLogFormatter", "main"]
