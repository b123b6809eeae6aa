"""`Client`, the blocking client SDK: an `AsyncClient` run on a private event-loop thread.

One implementation for both (every rule of `aio.py` and `core.py` holds here), and calls
from many threads share one connection. Hooks (`on_state`, `on_progress`) run on the
client's thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from ..link.health import PeerState
from ..liveness import DEFAULT_INTERVAL, DEFAULT_LIVENESS
from ..security.credentials import Credentials
from ..subscription import DEFAULT_HWM, AsyncSubscription, Event, Gap
from .aio import AsyncClient, ProgressHook, StateHook
from .core import DEFAULT_TIMEOUT

__all__ = ["Client", "Subscription"]

T = TypeVar("T")


class Client:
    """A blocking client of a broker (or of a list to fail over between); safe to share
    between threads.

    Args:
        broker: the broker's client endpoint, e.g. ``tcp://127.0.0.1:5555``, or a list.
        timeout: default budget of a call in seconds.
        retries: default number of automatic retries (of the errors in `AUTO_RETRY`).
        credentials: keys and token when the mesh runs with security on.
        heartbeat_interval: seconds of silence, while calls wait, before a heartbeat.
        liveness: intervals of silence before the broker counts as dead.
        on_state: called with (endpoint, old, new) at each change, on the client's thread.
    """

    def __init__(
        self,
        broker: str | Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 2,
        credentials: Credentials | None = None,
        heartbeat_interval: float = DEFAULT_INTERVAL,
        liveness: int = DEFAULT_LIVENESS,
        on_state: StateHook | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mesh-client", daemon=True)
        self._thread.start()
        options: dict[str, Any] = {
            "timeout": timeout,
            "retries": retries,
            "credentials": credentials,
            "heartbeat_interval": heartbeat_interval,
            "liveness": liveness,
            "on_state": on_state,
        }
        try:
            self._inner: AsyncClient = self._run(self._make(broker, options))
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()
            raise

    @staticmethod
    async def _make(broker: str | Sequence[str], options: dict[str, Any]) -> AsyncClient:
        return AsyncClient(broker, **options)

    @property
    def broker(self) -> str:
        """The endpoint of the broker the client talks to now."""
        return self._inner.broker

    @property
    def broker_state(self) -> PeerState:
        """Whether the current broker answers: up, suspect or dead (while failing over)."""
        return self._inner.broker_state

    @property
    def unmatched(self) -> int:
        """Replies that came for calls no longer waiting (late, or duplicates)."""
        return self._inner.unmatched

    @property
    def failovers(self) -> int:
        """Links opened in place of a dead one."""
        return self._inner.failovers

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(
        self,
        service: str,
        action: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        retries: int | None = None,
        metadata: dict[str, Any] | None = None,
        on_progress: ProgressHook | None = None,
        command_id: str | None = None,
    ) -> Any:
        """Blocking `AsyncClient.call`; same arguments, result and errors (`on_progress`
        runs on the client's thread)."""
        return self._run(
            self._inner.call(service, action, payload, timeout=timeout, retries=retries, metadata=metadata,
                             on_progress=on_progress, command_id=command_id)
        )

    def publish(
        self,
        topic: str,
        payload: Any = None,
        *,
        metadata: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> int:
        """Blocking `AsyncClient.publish`; same arguments, result and errors."""
        return self._run(self._inner.publish(topic, payload, metadata=metadata, timeout=timeout))

    def services(self, *, callable_only: bool = False, timeout: float | None = None) -> dict[str, Any]:
        """Blocking `AsyncClient.services`: the whole registry, read page by page."""
        return self._run(self._inner.services(callable_only=callable_only, timeout=timeout))

    def renew(self) -> float:
        """Blocking `AsyncClient.renew`."""
        return self._run(self._inner.renew())

    def subscribe(
        self, prefix: str = "", from_seq: int | Mapping[str, int] | None = None, *, hwm: int = DEFAULT_HWM
    ) -> Subscription:
        """Blocking `AsyncClient.subscribe`; iterate over the result for events and gaps."""
        return Subscription(self, self._run(self._inner.subscribe(prefix, from_seq, hwm=hwm)))

    def close(self) -> None:
        """Close the connection and stop the client's thread."""
        if self._loop.is_closed():
            return
        self._run(self._inner.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()


class Subscription:
    """A blocking view of an `AsyncSubscription` that runs on its `Client`'s thread.

    Iterating yields `Event`s and `Gap`s forever; `get(timeout)` returns None when
    nothing came in time. Close it (or use `with`) to stop.
    """

    def __init__(self, client: Client, inner: AsyncSubscription) -> None:
        self._client = client
        self._inner = inner

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Event | Gap]:
        while True:
            item = self.get()
            if item is not None:
                yield item

    def get(self, timeout: float | None = None) -> Event | Gap | None:
        """The next event or gap, or None after `timeout` seconds (None: wait for ever)."""
        return self._client._run(self._inner.get(timeout))

    @property
    def positions(self) -> dict[str, int]:
        return self._inner.positions

    @property
    def received(self) -> int:
        return self._inner.received

    @property
    def missed(self) -> int:
        return self._inner.missed

    @property
    def refused(self) -> int:
        """Events that failed their signature or decryption (each also a `Gap`, "refused")."""
        return self._inner.refused

    def close(self) -> None:
        if not self._client._loop.is_closed():
            self._client._run(self._inner.close())
