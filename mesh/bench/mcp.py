"""`mesh bench --mcp`: what the MCP bridge costs, against the MCP SDK's own floor and the mesh.

Rules of this module:

* One invocation measures five targets the same way, in turn, from this one process:
  the direct mesh client (`AsyncClient`) calling `echo.echo`; the bridge (`mesh mcp` as a
  subprocess) over stdio and over streamable HTTP, driven by the `mcp` SDK's
  `ClientSession`; and the SDK floor, an MCP server on the same SDK whose echo tool
  answers in-process (no mesh), over stdio and over HTTP (this module run with
  `python -m mesh.bench.mcp`).
* All five targets are opened (and warmed up) first and stay open; the measures are
  then interleaved: `rounds` rounds in which each target in turn makes `calls`
  sequential calls (p50, p99, calls/s), then `rounds` rounds in which each keeps
  `inflight` calls in flight on one session for `duration / rounds` seconds (calls/s),
  the order reversed every other round. A shared machine's speed drifts over seconds:
  measured one after the other, targets saw different machines (over seven such runs the
  bridge's HTTP p50 verdict ranged from 0.87 to 1.07); sampled in every round, they see
  the same drift (0.92 to 1.02 over six). Figures pool the rounds.
* The mesh is the command benchmark's (`mesh.bench.common`): one broker process and one echo node
  process, spawned, security off, over loopback TCP. The bridge runs with no credentials.
* The bridge's echo tool is looked up in its tool list (by name, title or `_meta`), so
  the benchmark holds whether the tool is called `echo.echo` or a portable `echo_echo`.
* The verdict is the issue's bar: the bridge's sequential p50 and p99 at most the floor's
  plus 1.2 times the direct client's, its throughput in flight at least 0.8 of the floor's.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from .common import STARTUP_S, figures, machine, mesh_broker, mesh_node, ratio, stop_all, wait_for_service

__all__ = ["McpBenchSettings", "echo_tool", "run_mcp_bench", "format_mcp_report"]

WARMUP_CALLS: Final = 20
ECHO: Final = "echo.echo"  # the mesh action every target echoes through
FLOOR_TOOL: Final = "echo"
READY = re.compile(r"ready url=(\S+)")
TARGETS: Final = ("direct", "bridge_stdio", "bridge_http", "floor_stdio", "floor_http")
SEQ_FACTOR: Final = 1.2  # the bar: bridge latency <= floor + 1.2 x direct
THROUGHPUT_FACTOR: Final = 0.8  # the bar: bridge throughput >= 0.8 x floor


@dataclass(frozen=True, slots=True)
class McpBenchSettings:
    calls: int = 80  # sequential calls per target and round
    inflight: int = 16
    duration: float = 5.0  # seconds of calls in flight per target, over all rounds
    payload: int = 64  # bytes of text echoed
    rounds: int = 5


Call = Callable[[], Awaitable[Any]]


async def _sequential(call: Call, calls: int, latencies: list[float]) -> float:
    """`calls` calls one after the other, each one's latency appended; returns the seconds taken."""
    began = time.perf_counter()
    for _ in range(calls):
        t0 = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - t0)
    return time.perf_counter() - began


async def _in_flight(call: Call, inflight: int, seconds: float) -> tuple[int, float]:
    """`inflight` calls kept in flight for `seconds`; returns (calls answered, seconds taken)."""
    count = 0
    end = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < end:
            await call()
            count += 1

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    return count, time.perf_counter() - began


# ------------------------------------------------------------------ targets


@asynccontextmanager
async def _direct(front: str, args: dict[str, Any]) -> AsyncIterator[Call]:
    from ..client import AsyncClient

    async with AsyncClient(front, timeout=30.0) as client:
        yield lambda: client.call("echo", "echo", args)


def echo_tool(tools: list[Any]) -> str:
    """The name under which a tool list offers the mesh's `echo.echo`.

    Matches the mesh name itself, its portable form (`echo_echo`), or a tool whose title
    or `_meta` carries the mesh name.

    Raises:
        LookupError: no listed tool is `echo.echo`.
    """
    for tool in tools:
        meta = json.dumps(getattr(tool, "meta", None) or {})
        if tool.name in (ECHO, ECHO.replace(".", "_")) or getattr(tool, "title", None) == ECHO or f'"{ECHO}"' in meta:
            return str(tool.name)
    raise LookupError(f"no {ECHO} tool among {[t.name for t in tools]}")


@asynccontextmanager
async def _session(streams: Any, args: dict[str, Any], floor: bool) -> AsyncIterator[Call]:
    """An initialized SDK session over `streams`, as a call of the echo tool."""
    from mcp.client.session import ClientSession

    read, write = streams
    async with ClientSession(read, write) as session:
        await session.initialize()
        tools = (await session.list_tools()).tools  # both sides: the client then checks results
        name = FLOOR_TOOL if floor else echo_tool(tools)

        async def call() -> Any:
            result = await session.call_tool(name, args)
            if result.is_error:
                raise RuntimeError(f"{name} failed: {result.content}")
            return result

        yield call


def _env() -> dict[str, str]:
    """This process's environment without mesh credentials: the bench runs security off."""
    return {k: v for k, v in os.environ.items() if k != "MESH_CREDENTIALS"}


@asynccontextmanager
async def _stdio(command: list[str], args: dict[str, Any], floor: bool) -> AsyncIterator[Call]:
    from mcp.client.stdio import StdioServerParameters, stdio_client

    params = StdioServerParameters(command=sys.executable, args=command, env=_env())
    async with stdio_client(params) as streams, _session(streams, args, floor) as call:
        yield call


@contextmanager
def _listening(command: list[str]) -> Iterator[str]:
    """Run `python COMMAND...` until the block ends; its URL from its `... ready url=URL` line."""
    proc = subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True, env=_env())
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            m = READY.search(line)
            if m:
                yield m.group(1)
                break
        else:
            raise RuntimeError(f"{' '.join(command)} exited before it listened (code {proc.wait()})")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@asynccontextmanager
async def _http(command: list[str], args: dict[str, Any], floor: bool) -> AsyncIterator[Call]:
    from mcp.client.streamable_http import streamable_http_client

    with _listening(command) as url:
        async with streamable_http_client(url) as streams, _session(streams, args, floor) as call:
            yield call


def _target(name: str, front: str, args: dict[str, Any]) -> Any:
    bridge = ["-m", "mesh", "mcp", "--broker", front, "--timeout", "30"]
    floor = ["-m", "mesh.bench.mcp"]
    return {
        "direct": lambda: _direct(front, args),
        "bridge_stdio": lambda: _stdio(bridge, args, floor=False),
        "bridge_http": lambda: _http([*bridge, "--http", "127.0.0.1:0"], args, floor=False),
        "floor_stdio": lambda: _stdio(floor, args, floor=True),
        "floor_http": lambda: _http([*floor, "--http"], args, floor=True),
    }[name]()


# ------------------------------------------------------------------- driver


@contextmanager
def _mesh(s: McpBenchSettings) -> Iterator[str]:
    """A broker and an echo node, spawned as `mesh bench` does; yields the clients' endpoint."""
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    procs: list[Any] = []
    try:
        broker = ctx.Process(target=mesh_broker, args=("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", ready, stop), daemon=True)
        procs.append(broker)
        broker.start()
        front, back = ready.get(timeout=STARTUP_S)
        node = ctx.Process(target=mesh_node, args=(back, s.inflight * 2, stop), daemon=True)
        procs.append(node)
        node.start()
        wait_for_service(front)
        yield front
    finally:
        stop_all(stop, procs)


@dataclass(slots=True)
class _Sample:
    """One target's measures, pooled over the rounds."""

    latencies: list[float] = field(default_factory=list)
    seq_s: float = 0.0
    inflight_calls: int = 0
    inflight_s: float = 0.0

    def figures(self) -> dict[str, Any]:
        fig = figures(len(self.latencies), self.latencies, self.seq_s)
        return {"calls": len(self.latencies), "p50_ms": fig["latency_ms"]["p50"], "p99_ms": fig["latency_ms"]["p99"],
                "sequential_per_s": fig["throughput"], "inflight_per_s": self.inflight_calls / self.inflight_s}


def _verdict(t: dict[str, dict[str, Any]], transport: str) -> dict[str, Any]:
    """The bridge over `transport` against the bar; each ratio passes at 1.0 or below (latency) or above (throughput)."""
    bridge, floor, direct = t[f"bridge_{transport}"], t[f"floor_{transport}"], t["direct"]
    out: dict[str, Any] = {}
    for q in ("p50_ms", "p99_ms"):
        bar = floor[q] + SEQ_FACTOR * direct[q]
        out[q] = {"bridge": bridge[q], "bar": bar, "ratio": ratio(bridge[q], bar), "ok": bridge[q] <= bar}
    bar = THROUGHPUT_FACTOR * floor["inflight_per_s"]
    out["inflight_per_s"] = {"bridge": bridge["inflight_per_s"], "bar": bar,
                             "ratio": ratio(bridge["inflight_per_s"], bar), "ok": bridge["inflight_per_s"] >= bar}
    return out


def run_mcp_bench(s: McpBenchSettings) -> dict[str, Any]:
    """Open every target against one mesh, measure them interleaved, `s.rounds` rounds; return the report."""
    args = {"text": "x" * s.payload}
    samples = {name: _Sample() for name in TARGETS}

    def orders() -> Iterator[tuple[str, ...]]:
        for r in range(s.rounds):
            yield TARGETS if r % 2 == 0 else TARGETS[::-1]

    async def measure(front: str) -> None:
        async with AsyncExitStack() as stack:
            calls: dict[str, Call] = {}
            for name in TARGETS:
                calls[name] = await stack.enter_async_context(_target(name, front, args))
                for _ in range(WARMUP_CALLS):
                    await calls[name]()
            for order in orders():
                for name in order:
                    samples[name].seq_s += await _sequential(calls[name], s.calls, samples[name].latencies)
            for order in orders():
                for name in order:
                    count, took = await _in_flight(calls[name], s.inflight, s.duration / s.rounds)
                    samples[name].inflight_calls += count
                    samples[name].inflight_s += took

    with _mesh(s) as front:
        asyncio.run(measure(front))
    targets = {name: samples[name].figures() for name in TARGETS}
    return {"settings": asdict(s), "machine": machine(), "targets": targets,
            "verdict": {tr: _verdict(targets, tr) for tr in ("stdio", "http")}}


LABELS: Final = {
    "direct": "direct mesh client", "bridge_stdio": "bridge, stdio", "bridge_http": "bridge, HTTP",
    "floor_stdio": "SDK floor, stdio", "floor_http": "SDK floor, HTTP",
}


def format_mcp_report(report: dict[str, Any]) -> str:
    """The report as a table for people: each target's figures, then the bridge against the bar."""
    s = report["settings"]
    row = "{:<20} {:>9} {:>9} {:>11} {:>14}"
    lines = [
        f"mcp: echo.echo, {s['payload']}-byte text, every target open at once and measured in turn: {s['rounds']} "
        f"rounds of {s['calls']} sequential calls, then {s['rounds']} of {s['duration'] / s['rounds']:g} s with "
        f"{s['inflight']} in flight ({s['duration']:g} s each in all), {report['machine']['cpus']} CPUs, security off",
        row.format("target", "p50 ms", "p99 ms", "seq calls/s", f"{s['inflight']} in flight/s"),
    ]
    for name in TARGETS:
        t = report["targets"][name]
        lines.append(row.format(LABELS[name], f"{t['p50_ms']:.2f}", f"{t['p99_ms']:.2f}",
                                f"{t['sequential_per_s']:,.0f}", f"{t['inflight_per_s']:,.0f}"))
    lines.append(f"bridge vs bar (latency: floor + {SEQ_FACTOR:g} x direct, ratio <= 1 passes; "
                 f"throughput: {THROUGHPUT_FACTOR:g} x floor, ratio >= 1 passes)")
    for transport, v in report["verdict"].items():
        parts = [f"{q.split('_')[0]} {v[q]['bridge']:.2f}/{v[q]['bar']:.2f} ms = {v[q]['ratio']:.2f}"
                 f"{'' if v[q]['ok'] else ' FAIL'}" for q in ("p50_ms", "p99_ms")]
        t = v["inflight_per_s"]
        parts.append(f"in flight {t['bridge']:,.0f}/{t['bar']:,.0f} = {t['ratio']:.2f}{'' if t['ok'] else ' FAIL'}")
        lines.append(f"  {transport:<5} " + ";  ".join(parts))
    return "\n".join(lines)


# -------------------------------------------------------------- the floor


def _floor_server() -> Any:
    """An MCP server on the bridge's SDK whose one tool echoes its arguments in-process.

    It is listed and answers as the bridge's echo tool is and does (the same input and
    output schemas, the JSON text and the object as structured content), so the
    difference between the two is the mesh and the bridge's own work.
    """
    import mcp_types as types
    from mcp.server import Server

    from ..nodes.echo import ECHO_RESULT, ECHO_SCHEMA

    # The bridge's echo tool's schemas: a client validates every result against the
    # output schema it was listed with, and that work must fall on both sides alike.
    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[types.Tool(name=FLOOR_TOOL, description="Echo the arguments.",
                                                       input_schema=ECHO_SCHEMA, output_schema=ECHO_RESULT)])

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        args = dict(params.arguments or {})
        return types.CallToolResult(content=[types.TextContent(text=json.dumps(args))], structured_content=args)

    return Server("mesh-bench-floor", on_list_tools=list_tools, on_call_tool=call_tool)


async def _serve_floor(http: bool) -> None:
    server = _floor_server()
    if not http:
        from mcp.server.stdio import stdio_server

        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())
        return
    import uvicorn
    from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager
    from starlette.applications import Starlette
    from starlette.routing import Route

    from ..mcp.serve import MCP_PATH

    # The SDK's own session manager in its fastest setting: every call answered with one
    # JSON body through the session (the bridge answers a call without progress so too,
    # but in the POST's own task: mesh/mcp/direct.py).
    manager = StreamableHTTPSessionManager(app=server, json_response=True)
    app = Starlette(routes=[Route(MCP_PATH, endpoint=StreamableHTTPASGIApp(manager))], lifespan=lambda _app: manager.run())
    # The bridge's own uvicorn settings (serve.serve_http), on a free loopback port.
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", access_log=False))
    task = asyncio.get_running_loop().create_task(uv.serve())
    while not uv.started and not task.done():
        await asyncio.sleep(0.02)
    if uv.started:
        port = uv.servers[0].sockets[0].getsockname()[1]
        print(f"floor ready url=http://127.0.0.1:{port}{MCP_PATH}", flush=True)
    await task


if __name__ == "__main__":  # the floor server: python -m mesh.bench.mcp [--http]
    try:
        asyncio.run(_serve_floor("--http" in sys.argv[1:]))
    except KeyboardInterrupt:
        pass
