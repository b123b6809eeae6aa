"""The streamable HTTP app: one JSON body per call, an event stream only for progress.

Streamable HTTP lets a server answer each POST with either a JSON body or an SSE stream.
The SDK picks one for the whole server (`json_response`); its SSE answer costs about a
millisecond more per call whenever the handler awaits anything (headers and event go
out in separate writes, and each request starts its own stream tasks), which is every
bridge call, since each waits for the mesh. A stream is needed only when the server has
something to send before the result, and the bridge's only such message is progress,
sent only to a caller that gave a progress token. So:

* a request with `params._meta.progressToken` is answered with an event stream (its
  progress notifications, then the result), as before;
* every other request is answered with one `application/json` body.

The choice is made per POST through a context variable that the transport's
`is_json_response_enabled` reads: the POST handler runs in its own task, so concurrent
calls of one session each see their own choice, and the session's message router (a
task started before any choice) sees the default, streams, so it never drops a message.
Anything else a future bridge sends in the scope of a call must come with a token, or
it would take the result's place in a JSON answer.

With `direct` (the bridge's `DirectCalls`), a `tools/call` it takes is answered in the
POST's task instead of through the session (`direct.py` says when and why); the
transport checks the Accept and Content-Type headers and the session id first, with
the SDK's own methods, as for any POST.
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final

import pydantic_core
from mcp.server.streamable_http import REQUEST_CANCELLED, StreamableHTTPServerTransport
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import INTERNAL_ERROR, ErrorData
from starlette.applications import Starlette
from starlette.routing import Route

from .direct import ENDED, GONE, Stopped, asks_for_progress, error_answer

if TYPE_CHECKING:
    from mcp.server import Server
    from starlette.requests import Request
    from starlette.types import Message, Receive, Scope, Send

    from .direct import Call, DirectCalls

__all__ = ["http_app", "wants_stream"]

_ANSWER_AS_JSON: ContextVar[bool] = ContextVar("mesh_mcp_answer_as_json", default=False)
LOOPBACK: Final = ("127.0.0.1", "localhost", "::1")


def wants_stream(body: bytes) -> bool:
    """Whether a POST body asks for what only an event stream can carry: progress.

    Anything that is not one JSON-RPC request object (a notification, a response, bad
    JSON, JSON nested past the parser's limit) is left to the SDK's default handling,
    which answers it the same either way.
    """
    try:
        message = pydantic_core.from_json(body)
    except ValueError:
        return True
    if not isinstance(message, dict) or "id" not in message or "method" not in message:
        return True
    return asks_for_progress(message.get("params"))


class _PerCallTransport(StreamableHTTPServerTransport):
    """The SDK's transport, with the JSON-or-stream choice made per POST, and direct calls."""

    _direct: DirectCalls | None = None  # set per session by `_SessionManager`

    @property
    def is_json_response_enabled(self) -> bool:
        return _ANSWER_AS_JSON.get()

    @is_json_response_enabled.setter
    def is_json_response_enabled(self, value: bool) -> None:
        """The SDK sets the server-wide flag at construction; the per-POST choice rules."""

    async def _handle_post_request(self, scope: Scope, request: Request, receive: Receive, send: Send) -> None:
        # Starlette keeps the body it read, so the SDK's own read below costs nothing.
        body = await request.body()
        direct = self._direct
        call = None if direct is None else direct.take(body, self.mcp_session_id)
        choice = _ANSWER_AS_JSON.set(call is not None or not wants_stream(body))
        try:
            if call is not None and direct is not None and self._check_content_type(request):
                await self._answer_directly(direct, call, scope, request, receive, send)
            elif direct is not None and direct.in_flight:
                # A notifications/cancelled for a direct call counts once the SDK accepted
                # it (202), as it counts for the calls the session runs.
                status = 0

                async def noting(message: Message) -> None:
                    nonlocal status
                    if message["type"] == "http.response.start":
                        status = message["status"]
                    await send(message)

                await super()._handle_post_request(scope, request, receive, noting)
                if status == HTTPStatus.ACCEPTED:
                    direct.cancel(body, self.mcp_session_id)
            else:
                await super()._handle_post_request(scope, request, receive, send)
        finally:
            _ANSWER_AS_JSON.reset(choice)

    async def _answer_directly(self, direct: DirectCalls, call: Call, scope: Scope, request: Request,
                               receive: Receive, send: Send) -> None:
        # The SDK's checks, in its order, each answering a refusal itself.
        if not await self._validate_accept_header(request, scope, send):
            return
        if not await self._validate_request_headers(request, send):
            return
        session = self.mcp_session_id
        assert session is not None  # `take` found the session by it
        pending = direct.begin(call, session)
        watch = asyncio.get_running_loop().create_task(_until_disconnected(receive))

        def gone(w: asyncio.Task[None]) -> None:
            if not w.cancelled() and w.exception() is None:
                direct.abandon(call, session)

        watch.add_done_callback(gone)
        try:
            answer = await pending
        finally:
            watch.cancel()
        if answer is GONE:  # nobody to answer
            return
        if answer is ENDED:  # the session ended first: the SDK's own answer then
            response = self._create_error_response("Session terminated before the request completed",
                                                   HTTPStatus.INTERNAL_SERVER_ERROR, INTERNAL_ERROR)
        elif isinstance(answer, Stopped):  # cancelled: this era's wire still ends the request, as the SDK does
            response = self._create_json_response(error_answer(call, ErrorData(code=REQUEST_CANCELLED, message="Request cancelled")))
        else:
            response = self._create_json_response(answer)
        await response(scope, receive, send)

    async def terminate(self) -> None:
        if self._direct is not None and self.mcp_session_id is not None:
            self._direct.end(self.mcp_session_id)
        await super().terminate()


async def _until_disconnected(receive: Receive) -> None:
    """Return once the client has closed the connection (the body was read before: nothing else comes)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class _SessionManager(StreamableHTTPSessionManager):
    """The SDK's session manager, whose sessions use `_PerCallTransport`."""

    def __init__(self, *args: Any, direct: DirectCalls | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._direct = direct

    def _admit_session(self, requestor: Any) -> StreamableHTTPServerTransport | None:
        transport = super()._admit_session(requestor)
        if transport is not None:
            # Same layout, one overridden property and method: the SDK builds the object,
            # with every setting it owns, and this only changes how it answers a POST.
            transport.__class__ = _PerCallTransport
            assert isinstance(transport, _PerCallTransport)
            transport._direct = self._direct
        return transport


def http_app(server: Server[Any], path: str, host: str, *, https: bool = False,
             direct: DirectCalls | None = None) -> Starlette:
    """The ASGI app serving `server` over streamable HTTP at `path`.

    As the SDK's own app, with DNS-rebinding protection for a loopback host (its https
    origins allowed too when `https`), and with each call answered as above (`direct`:
    the tool calls it takes answered in the POST's task).
    """
    security = None
    if host in LOOPBACK:
        names = ("127.0.0.1", "localhost", "[::1]")
        schemes = ("http", "https") if https else ("http",)
        security = TransportSecuritySettings(enable_dns_rebinding_protection=True,
                                             allowed_hosts=[f"{n}:*" for n in names],
                                             allowed_origins=[f"{s}://{n}:*" for s in schemes for n in names])
    manager = _SessionManager(app=server, security_settings=security, direct=direct)
    return Starlette(routes=[Route(path, endpoint=StreamableHTTPASGIApp(manager))],
                     lifespan=lambda _app: manager.run())
