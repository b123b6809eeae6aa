"""The MCP server side of the bridge: every callable mesh action as an MCP tool.

Rules of this module:

* The bridge is one mesh client (`AsyncClient`) with its own credentials and role. It
  asks the broker for the actions that role may call (`mesh.services` with
  `{"callable": true}`, every page), so a tool the role may not call is never listed;
  the broker still checks every call, so an unlisted tool cannot be called either.
* The tool list follows the registry: the bridge subscribes to the broker's
  `mesh.service.*` lifecycle events, asks for the registry again, and when the tools
  changed tells every MCP client: per session with `notifications/tools/list_changed`
  (handshake-era clients) and on `subscriptions/listen` streams (2026-07-28 clients).
* A call never crashes the bridge: bad arguments and every mesh error come back as a
  tool result with `isError` and the error's code, name and message. A tool the bridge
  does not list is a protocol error instead (JSON-RPC -32602, as the MCP spec says),
  its data the mesh error (HANDLER_NOT_FOUND).
  A cancelled MCP request cancels the mesh command (`AsyncClient.call` sends the
  broker a `cancel`); progress the node reports is passed on to a client that asked
  for it with a progress token.
* Resources: `mesh://services` (the whole registry the bridge exposes), one resource per
  service, and the template `mesh://services/{service}` for any one service.
* Transports live in `serve.py`; this module only builds the `Server`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import Mapping
from typing import Any, Final

import mcp_types as types
from mcp.server import NotificationOptions, Server, ServerRequestContext
from mcp.server.connection import Connection
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler, ResourcesListChanged, ToolsListChanged
from mcp.shared.exceptions import MCPError

from ..client import AsyncClient, ProgressHook
from ..protocol import (
    ErrorCode,
    HandlerNotFoundError,
    InternalError,
    MeshError,
    PayloadValidator,
    compile_schema,
)
from .direct import DirectCalls
from .tools import (
    REGISTRY_URI,
    Selection,
    ToolSpec,
    as_text,
    find_tool,
    schema_uri,
    selected_registry,
    tools_from_registry,
)

__all__ = ["Bridge", "SERVICE_EVENTS"]

log = logging.getLogger("mesh.mcp")

SERVICE_EVENTS: Final = "mesh.service"  # the broker's registered/unregistered events
SERVICE_TEMPLATE: Final = schema_uri("{service}")  # RFC 6570: one service's registry entry
LIST_CHANGES: Final = NotificationOptions(tools_changed=True, resources_changed=True)
RESUBSCRIBE_S: Final = 1.0  # pause before subscribing again after the event link failed


class Bridge:
    """Mesh actions as MCP tools for any number of MCP sessions.

    Args:
        client: the bridge's mesh client (its credentials give the bridge its role).
        selection: include and exclude patterns over mesh names (`service.action`).
        timeout: the budget of one tool call in seconds, sent to the mesh as its deadline.
        name: the MCP server name.
    """

    def __init__(self, client: AsyncClient, *, selection: Selection = Selection(), timeout: float = 30.0,
                 name: str = "mesh") -> None:
        self.client = client
        self.selection = selection
        self.timeout = timeout
        self.tools: dict[str, ToolSpec] = {}
        self.registry: dict[str, Any] = {}
        self._validators: dict[str, PayloadValidator] = {}
        self._connections: weakref.WeakSet[Connection] = weakref.WeakSet()  # handshake-era clients
        self.bus = InMemorySubscriptionBus()
        self.listen = ListenHandler(self.bus)
        self._watcher: asyncio.Task[None] | None = None
        self.server: Server[Any] = _BridgeServer(
            name,
            version=_version(),
            instructions="Each tool is one action of a service in a mesh; arguments are the action's payload.",
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
            on_list_resources=self._list_resources,
            on_read_resource=self._read_resource,
            on_list_resource_templates=self._list_resource_templates,
            on_subscriptions_listen=self.listen,
        )
        self.direct = DirectCalls(self.call_tool, self.server.middleware)  # tool calls over HTTP in the POST's task
        self.server.add_notification_handler(
            "notifications/initialized", types.NotificationParams, self._on_initialized
        )

    def initialization_options(self) -> Any:
        """What the bridge tells clients it can do (the tool list may change)."""
        return self.server.create_initialization_options()

    # ------------------------------------------------------------ the registry

    async def start(self) -> None:
        """Load the tools, then follow the registry's changes until `close`.

        Raises:
            MeshError: the broker could not be asked for the registry.
        """
        await self.refresh()
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def refresh(self) -> bool:
        """Ask the broker for what the bridge may call; return whether the tools changed."""
        registry = await self.client.services(callable_only=True, timeout=self.timeout)
        tools = tools_from_registry(registry if isinstance(registry, Mapping) else {}, self.selection)
        before, self.tools = self.tools, {t.name: t for t in tools}
        self.registry = selected_registry(registry, tools)
        # A validator stays only while its tool (and so its schema) is the same.
        self._validators = {n: v for n, v in self._validators.items() if before[n] == self.tools.get(n)}
        return tools != list(before.values())

    async def _watch(self) -> None:
        """Refresh on every service lifecycle event; tell clients when the tools changed."""
        while True:
            try:
                sub = await self.client.subscribe(SERVICE_EVENTS)
            except MeshError as err:
                log.warning("cannot follow the registry (%s); trying again", err.message)
                await asyncio.sleep(RESUBSCRIBE_S)
                continue
            try:
                # Registered between the first refresh and the subscription: look again.
                await self._changed()
                while True:
                    if await sub.get() is not None:
                        await self._changed()
            except MeshError as err:
                log.warning("lost the registry's events (%s); subscribing again", err.message)
            finally:
                await sub.close()

    async def _changed(self) -> None:
        if await self.refresh():
            log.info("tools changed: %s", ", ".join(self.tools) or "none")
            await self.notify()

    async def notify(self) -> None:
        """Tell every session, and every listen stream, that tools and resources changed."""
        for connection in list(self._connections):
            await connection.send_tool_list_changed()  # best effort: never raises
            await connection.send_resource_list_changed()
        await self.bus.publish(ToolsListChanged())
        await self.bus.publish(ResourcesListChanged())

    async def _on_initialized(self, ctx: ServerRequestContext[Any], params: types.NotificationParams) -> None:
        # The session object is made per message; the connection lives as long as the
        # client does, and is what a standalone notification goes out on. The SDK has no
        # public accessor for it yet (its own `Context.connection` is not built for
        # lowlevel handlers), hence the private attribute.
        connection = ctx.session._connection
        self._connections.add(connection)
        self.direct.remember(connection)

    async def close(self) -> None:
        """Stop following the registry and end the listen streams."""
        self.listen.close()
        if self._watcher is not None:
            self._watcher.cancel()
            try:
                await self._watcher
            except (asyncio.CancelledError, MeshError):
                pass

    # ------------------------------------------------------------------- tools

    async def _list_tools(self, ctx: ServerRequestContext[Any], params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(
            tools=[
                types.Tool(
                    name=t.name,
                    title=t.mesh_name,
                    _meta={"mesh/name": t.mesh_name},
                    description=t.description,
                    input_schema=t.input_schema,
                    output_schema=t.output_schema,
                    annotations=types.ToolAnnotations.model_validate(t.annotations()),
                )
                for t in self.tools.values()
            ]
        )

    async def _call_tool(self, ctx: ServerRequestContext[Any], params: types.CallToolRequestParams) -> types.CallToolResult:
        return await self.call_tool(params, _progress_relay(ctx))

    async def call_tool(self, params: types.CallToolRequestParams,
                        on_progress: ProgressHook | None = None) -> types.CallToolResult:
        """One tool call: the mesh command's result, or its error, as a tool result.

        Raises:
            MCPError: the bridge lists no such tool (INVALID_PARAMS, data HANDLER_NOT_FOUND).
        """
        tool = find_tool(self.tools, params.name)
        if tool is None:
            raise _unknown_tool(params.name)
        try:
            self._validator(tool)(dict(params.arguments or {}))
            payload = tool.payload(params.arguments)
            result = await self.client.call(tool.service, tool.action, payload, timeout=self.timeout,
                                            on_progress=on_progress)
        except MeshError as err:
            return _error_result(err)
        try:
            text = as_text(result)  # once: the structured content is the same JSON, read back
        except ValueError:
            log.warning("tool %s: the result holds NaN or an infinity, which JSON cannot carry: refused", tool.name)
            return _error_result(InternalError(f"{tool.service}.{tool.action} returned NaN or an infinity, which JSON "
                                               "(and so MCP) cannot carry", details={"tool": tool.name}))
        return types.CallToolResult(content=[types.TextContent(text=text)],
                                    structured_content=tool.structured(json.loads(text)))

    def _validator(self, tool: ToolSpec) -> PayloadValidator:
        check = self._validators.get(tool.name)
        if check is None:
            check = self._validators[tool.name] = compile_schema(tool.input_schema)
        return check

    # --------------------------------------------------------------- resources

    async def _list_resources(self, ctx: ServerRequestContext[Any], params: Any) -> types.ListResourcesResult:
        resources = [types.Resource(uri=REGISTRY_URI, name="services", mime_type="application/json",
                                    description="Every service and action the bridge exposes, with JSON Schemas.")]
        resources += [
            types.Resource(uri=schema_uri(s), name=s, mime_type="application/json",
                           description=f"The actions of the service {s} and their JSON Schemas.")
            for s in self.registry
        ]
        return types.ListResourcesResult(resources=resources)

    async def _list_resource_templates(self, ctx: ServerRequestContext[Any], params: Any) -> types.ListResourceTemplatesResult:
        # One template stands for every service, present or future: a client can read
        # mesh://services/<name> for a service it learned of elsewhere.
        template = types.ResourceTemplate(uri_template=SERVICE_TEMPLATE, name="service", mime_type="application/json",
                                          description="The actions of one service and their JSON Schemas.")
        return types.ListResourceTemplatesResult(resource_templates=[template])

    async def _read_resource(self, ctx: ServerRequestContext[Any], params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
        uri = str(params.uri)
        if uri == REGISTRY_URI:
            body: Any = self.registry
        else:
            service = uri.removeprefix(schema_uri(""))
            if uri == service or service not in self.registry:
                raise MCPError(code=types.INVALID_PARAMS, message=f"no resource {uri}")
            body = self.registry[service]
        text = json.dumps(_json_safe(body), indent=2, sort_keys=True)
        return types.ReadResourceResult(contents=[types.TextResourceContents(uri=uri, mime_type="application/json", text=text)])


class _BridgeServer(Server[Any]):
    """The SDK's server, announcing the bridge's list changes on every transport.

    The streamable HTTP session manager builds each session's `initialize` answer from
    `create_initialization_options()` with no arguments, so the bridge's notification
    options must be the default: given only to `run` (stdio), HTTP clients were told
    the tool and resource lists never change.
    """

    def create_initialization_options(self, notification_options: NotificationOptions | None = None,
                                      *args: Any, **kwargs: Any) -> Any:
        return super().create_initialization_options(notification_options or LIST_CHANGES, *args, **kwargs)


def _progress_relay(ctx: ServerRequestContext[Any]) -> ProgressHook:
    """A mesh progress callback that passes reports on to the MCP caller.

    The SDK sends them only when the caller asked (with a progress token), so a call
    without one costs a dropped report per progress message, and nothing without them.
    """
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    def relay(progress: float, total: float | None, message: str | None) -> None:
        task = loop.create_task(ctx.session.report_progress(progress, total, message))
        pending.add(task)
        task.add_done_callback(pending.discard)

    return relay


def _unknown_tool(name: str) -> MCPError:
    """A call to a tool the bridge does not list: a JSON-RPC error, as the MCP spec asks.

    The error's data carries the mesh code (HANDLER_NOT_FOUND), like every mesh error.
    """
    err = HandlerNotFoundError(f"Unknown tool: {name} (not registered, or the bridge's role may not call it)",
                               details={"tool": name})
    return MCPError(code=types.INVALID_PARAMS, message=err.message, data=_error_data(err))


def _error_data(err: MeshError) -> dict[str, Any]:
    """A mesh error as JSON: code, name, message, retryable and details."""
    try:
        name = ErrorCode(err.code).name
    except ValueError:
        name = "UNKNOWN"
    error = {"code": int(err.code), "name": name, "message": err.message, "retryable": bool(err.retryable)}
    if err.details:
        error["details"] = _json_safe(err.details)
    return error


def _error_result(err: MeshError) -> types.CallToolResult:
    """A mesh error as a tool result the model can read: code, name and message."""
    error = _error_data(err)
    return types.CallToolResult(
        content=[types.TextContent(text=f"mesh error {error['code']} {error['name']}: {err.message}")],
        structured_content={"error": error},
        is_error=True,
    )


def _json_safe(value: Any) -> Any:
    """MessagePack values as JSON values (bytes become hex)."""
    return json.loads(as_text(value, strict=False))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("zmq-mcp-mesh")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0"

