"""The client SDK that AI tools use: `AsyncClient` for asyncio, `Client` for plain code.

Layers (each module states its rules):

* `core.py`: the decisions, sans-IO (which errors retry and after how long, the failover
  order, when a new broker's nodes may still be rejoining); time comes in as `now`.
* `aio.py`: `AsyncClient`, the asyncio loop that owns the socket and acts on them.
* `sync.py`: `Client`, the blocking, thread-safe wrapper around an `AsyncClient`.
"""

from __future__ import annotations

from .aio import AsyncClient, ProgressHook, StateHook
from .core import AUTO_RETRY, DEFAULT_TIMEOUT, reachable
from .sync import Client, Subscription

__all__ = ["AUTO_RETRY", "DEFAULT_TIMEOUT", "AsyncClient", "Client", "ProgressHook", "StateHook", "Subscription", "reachable"]
