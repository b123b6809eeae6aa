"""Tool calls answered beside the SDK's session: in the POST's own task over HTTP, in a task per line over stdio.

Why: the SDK answers every request by way of the session: over HTTP the body is put on
the session's stream, taken by its dispatcher into a task of its own, handled, and the
answer routed back to the waiting POST through two more streams. That machinery cost
about 0.75 ms of CPU per call here (docs/mcp.md "Cost"), more than the mesh call a
bridge call carries. For the one hot request, a `tools/call` that asked for no progress
on a session whose handshake is complete, the bridge answers itself (`httpapp.py` and
`serve.DirectLines` carry the bytes), with the SDK's own checks and shapes for the
session's protocol revision: the JSON-RPC message adapter, the request's per-revision
validation and params model, the result's per-revision sieve, the same error mapping. Any other message, and any such request
those checks refuse, goes the SDK's way untouched, so every error answer stays the
SDK's own.

Rules of this module:

* `DirectCalls.take` decides from the body and the session alone (no I/O): a request
  it returns None for is the SDK's.
* A session qualifies once its client sent `notifications/initialized`: the bridge hands
  the session's connection over then (`remember`), and its negotiated revision is what
  requests are validated and results shaped for. Before that, the SDK's own gate rules.
* A `notifications/cancelled` naming a call in flight here cancels it (the mesh command
  with it), over HTTP once the SDK accepted the notification (its header and session
  checks, its 202). A session that ends (deleted, idle past its timeout, its input
  closed) cancels its calls here too. Its answer then says which (`Stopped`), and the
  transport answers as the SDK's transport does: over HTTP a cancelled call gets
  `REQUEST_CANCELLED` and an outlived one the SDK's 500; over stdio a cancelled call gets
  no answer and an outlived one `CONNECTION_CLOSED`.
* A call is in flight from the moment it is taken (`begin`), before its task first runs:
  a cancellation on the next line of the same read finds it, as the SDK's does.
* A stdio session has a key of its own (`STDIO_SESSION`), so sessions served side by side
  in one process (the tests do) never see each other's calls.
* The server's middleware wraps each call as the SDK's runner does (the SDK's default,
  an OpenTelemetry span per request, with the client's trace context), given a context
  without a session; the bridge installs no middleware of its own, and a rewrite of the
  context by one would not be followed here.
* Deliberately not as the SDK: two calls in flight with one id on one session each get
  their own answer (the SDK's transport keys its answers by id, so the first POST never
  returns and the second gets the first's result); and a call whose HTTP client
  disconnects before its answer is cancelled (`abandon`), where the SDK's session lets
  the mesh command run on for nobody.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable, Coroutine, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final, cast

import pydantic_core
from mcp.server.connection import Connection
from mcp.server.context import CallNext, HandlerResult, ServerMiddleware, ServerRequestContext
from mcp.shared.dispatcher import coerce_request_id
from mcp.shared.exceptions import MCPError
from mcp.shared.jsonrpc_dispatcher import cancelled_request_id_from_params, handler_exception_to_error_data
from mcp_types import (
    INTERNAL_ERROR,
    CallToolRequestParams,
    CallToolResult,
    ErrorData,
    JSONRPCError,
    JSONRPCNotification,
    JSONRPCRequest,
    JSONRPCResponse,
    RequestId,
    jsonrpc_message_adapter,
)
from mcp_types.methods import serialize_server_result, validate_client_request
from pydantic import ValidationError

__all__ = ["BY_CLIENT", "ENDED", "GONE", "STDIO_SESSION", "Answer", "Call", "DirectCalls", "Stopped", "asks_for_progress",
           "error_answer"]

log = logging.getLogger("mesh.mcp")

# The stdio session being served in this context (HTTP sessions are keyed by their own id).
STDIO_SESSION: ContextVar[str | None] = ContextVar("mesh_mcp_stdio_session", default=None)
METHOD: Final = "tools/call"
CANCELLED: Final = "notifications/cancelled"


class Stopped(str):
    """Why a direct call ended without an answer of its own."""


BY_CLIENT: Final = Stopped("cancelled by the client")
ENDED: Final = Stopped("its session ended")
GONE: Final = Stopped("its client went away")
Answer = JSONRPCResponse | JSONRPCError | Stopped

ToolCall = Callable[[CallToolRequestParams], Coroutine[Any, Any, CallToolResult]]


def asks_for_progress(params: Any) -> bool:
    """Whether a request's params carry a progress token, which only an event stream can honour.

    Any value but null counts: the SDK's params model takes `true` or `1.0` as a token too.
    """
    meta = params.get("_meta") if isinstance(params, Mapping) else None
    return isinstance(meta, Mapping) and meta.get("progressToken") is not None


@dataclass(frozen=True, slots=True)
class Call:
    """A `tools/call` this path answers: its id, its params (raw and typed), the session's revision."""

    request_id: RequestId
    raw: Mapping[str, Any] | None
    params: CallToolRequestParams
    version: str


class DirectCalls:
    """The sessions whose tool calls may be answered directly, and the calls in flight.

    Args:
        call: answers one tool call (the bridge's), raising `MCPError` for a protocol error.
        middleware: the server's (`Server.middleware`), run around each call.
    """

    def __init__(self, call: ToolCall, middleware: Sequence[ServerMiddleware[Any]] = ()) -> None:
        self._call = call
        self._middleware = middleware
        self._connections: weakref.WeakValueDictionary[str, Connection] = weakref.WeakValueDictionary()
        self._in_flight: dict[tuple[str, Any], asyncio.Task[dict[str, Any]]] = {}
        self._stopped: dict[asyncio.Task[dict[str, Any]], Stopped] = {}  # why a call was cancelled

    @property
    def in_flight(self) -> bool:
        """Whether any call answered here is running (only then can a cancellation name one)."""
        return bool(self._in_flight)

    def remember(self, connection: Connection) -> None:
        """A session whose client completed the handshake: its calls may come this way.

        An HTTP session is known by its id; a stdio session by the key its `serve_lines`
        set in the context its messages are handled in (`STDIO_SESSION`).
        """
        key = connection.session_id or STDIO_SESSION.get()
        if key is not None:
            self._connections[key] = connection

    def take(self, body: bytes | str, session_id: str | None) -> Call | None:
        """The call in `body` (a POST's, or a line over stdio) if this path answers it; None leaves it to the SDK."""
        if session_id is None or not _mentions(body, METHOD):
            return None
        connection = self._connections.get(session_id)
        if connection is None or not connection.initialized.is_set():
            return None
        try:
            message = jsonrpc_message_adapter.validate_python(pydantic_core.from_json(body), by_name=False)
        except ValueError:  # bad JSON, or not a JSON-RPC message (ValidationError is a ValueError)
            return None
        if not isinstance(message, JSONRPCRequest) or message.method != METHOD:
            return None
        if asks_for_progress(message.params):
            return None  # progress needs the SDK's event stream
        if (session_id, coerce_request_id(message.id)) in self._in_flight:
            return None  # an id reused while in flight: the SDK's rules apply
        version = connection.protocol_version
        try:
            validate_client_request(METHOD, version, message.params)
            params = CallToolRequestParams.model_validate(message.params or {}, by_name=False)
        except (KeyError, ValueError):
            return None
        return Call(message.id, message.params, params, version)

    def cancel(self, body: bytes | str, session_id: str | None) -> None:
        """Cancel the call in flight that a `notifications/cancelled` in `body` names, if any.

        Read as the SDK's dispatcher reads it: a JSON-RPC notification by the message
        adapter (escapes decoded; an error or response carrying a `method` is not one).
        """
        if session_id is None or not self._in_flight:
            return
        try:
            message = jsonrpc_message_adapter.validate_python(pydantic_core.from_json(body), by_name=False)
        except ValueError:
            return
        if not isinstance(message, JSONRPCNotification) or message.method != CANCELLED:
            return
        request_id = cancelled_request_id_from_params(message.params)
        if request_id is not None:
            self._stop((session_id, coerce_request_id(request_id)), BY_CLIENT)

    def end(self, session_id: str) -> None:
        """The session ended (deleted, idle too long, input closed): forget it and cancel its calls, as the SDK does."""
        self._connections.pop(session_id, None)
        for key in [k for k in self._in_flight if k[0] == session_id]:
            self._stop(key, ENDED)

    def abandon(self, call: Call, session_id: str) -> None:
        """The client that sent `call` went away (its HTTP connection closed): cancel it, nobody waits for it."""
        self._stop((session_id, coerce_request_id(call.request_id)), GONE)

    def _stop(self, key: tuple[str, Any], why: Stopped) -> None:
        task = self._in_flight.get(key)
        if task is not None and not task.done():
            self._stopped[task] = why
            task.cancel()

    def begin(self, call: Call, session_id: str) -> Coroutine[Any, Any, Answer]:
        """Start `call` now, in flight at once (a cancellation read next finds it); await the result for its answer.

        The answer is shaped as the SDK would shape it for the session's revision, or a
        `Stopped`: the client cancelled the call, or its session ended first (the
        transport answers as the SDK's transport does then).
        """
        key = (session_id, coerce_request_id(call.request_id))
        task = asyncio.get_running_loop().create_task(self._run(call))
        self._in_flight[key] = task
        return self._finish(call, key, task)

    async def _finish(self, call: Call, key: tuple[str, Any], task: asyncio.Task[dict[str, Any]]) -> Answer:
        try:
            result = await task
            if task in self._stopped:  # cancelled, but the call returned all the same
                raise asyncio.CancelledError
        except asyncio.CancelledError:
            why = self._stopped.get(task)
            current = asyncio.current_task()
            if why is None or (current is not None and current.cancelling()):
                raise  # the caller itself was cancelled (shutdown): awaiting cancelled the call too
            return why
        except Exception as exc:
            error = handler_exception_to_error_data(exc)
            if error is None:  # a bug in the bridge: logged, answered as the SDK answers one
                log.exception("tools/call %s raised", call.params.name)
                error = ErrorData(code=0, message=str(exc))
            return error_answer(call, error)
        finally:
            if self._in_flight.get(key) is task:  # a reused id's newer call keeps its entry
                del self._in_flight[key]
            self._stopped.pop(task, None)
        return JSONRPCResponse(jsonrpc="2.0", id=call.request_id, result=result)

    async def _run(self, call: Call) -> dict[str, Any]:
        """The call inside the server's middleware, shaped for the wire within it (as the SDK's runner does)."""

        async def inner(ctx: ServerRequestContext[Any, Any]) -> HandlerResult:
            result = await self._call(call.params)
            try:
                return serialize_server_result(METHOD, call.version,
                                               result.model_dump(by_alias=True, mode="json", exclude_none=True))
            except ValidationError:
                log.exception("tools/call %s returned an invalid result", call.params.name)
                raise MCPError(code=INTERNAL_ERROR, message="Handler returned an invalid result") from None

        chain: CallNext = inner
        for middleware in reversed(self._middleware):
            chain = _wrap(middleware, chain)
        ctx: ServerRequestContext[Any, Any] = ServerRequestContext(
            session=cast(Any, None), lifespan_context=None, protocol_version=call.version, method=METHOD,
            params=call.raw, request_id=call.request_id, meta=call.params.meta)
        return cast(dict[str, Any], await chain(ctx))


def _wrap(middleware: ServerMiddleware[Any], call_next: CallNext) -> CallNext:
    async def wrapped(ctx: ServerRequestContext[Any, Any]) -> HandlerResult:
        return await middleware(ctx, call_next)

    return wrapped


def _mentions(body: bytes | str, text: str) -> bool:
    """A cheap first look: a body that does not contain `text` literally is not worth parsing for it."""
    return text in body if isinstance(body, str) else text.encode() in body


def error_answer(call: Call, error: ErrorData) -> JSONRPCError:
    """The JSON-RPC error that answers `call` (each transport's answers to a stopped call too)."""
    return JSONRPCError(jsonrpc="2.0", id=call.request_id, error=error)
