"""The client SDK that AI tools use: `AsyncClient` for asyncio, `Client` for plain code.

Layers (each module states its rules):

* `core.py`: the decisions, sans-IO (which errors retry and after how long, the failover
  order, when a new broker's nodes may still be rejoining); time comes in as `now`.
* `aio.py`: `AsyncClient`, the asyncio loop that owns the socket and acts on them.
* `sync.py`: `Client`, the blocking, thread-safe wrapper around an `AsyncClient`.

The socket-owning names load on first use (PEP 562), so importing `mesh.client.core`
loads no ZeroMQ, as for every sans-IO core; `from mesh.client import Client` is unchanged.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .core import AUTO_RETRY, DEFAULT_TIMEOUT, reachable

if TYPE_CHECKING:
    from .aio import AsyncClient, ProgressHook, StateHook
    from .sync import Client, Subscription

__all__ = ["AUTO_RETRY", "DEFAULT_TIMEOUT", "AsyncClient", "Client", "ProgressHook", "StateHook", "Subscription", "reachable"]

# Which module defines each name loaded on first use.
_LAZY = {"AsyncClient": "aio", "ProgressHook": "aio", "StateHook": "aio", "Client": "sync", "Subscription": "sync"}


def __getattr__(name: str) -> Any:
    """Load `AsyncClient`, `Client` and their hook types (and ZeroMQ) when first asked for."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
