"""The MCP bridge: mesh service actions as Model Context Protocol tools (`mesh mcp`).

`tools` turns the registry into tools (no I/O), `bridge` is the MCP server on the
official SDK, `serve` runs it over stdio or streamable HTTP. docs/mcp.md says how to
use it.
"""

from .bridge import Bridge
from .tools import Selection, ToolSpec, tools_from_registry

__all__ = ["Bridge", "Selection", "ToolSpec", "tools_from_registry"]
