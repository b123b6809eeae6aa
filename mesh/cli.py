"""The `mesh` command: each subcommand parses, calls the library, prints.

Errors are `click.ClickException`s with an exit code: 1 for an error the mesh answered
(printed with its code), 2 for bad usage or configuration.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import sys
import threading
from typing import Any, NoReturn

import click

from .broker.core import BrokerConfig
from .process import tune_for_serving
from .protocol import ConfigurationError, MeshError

DEFAULT_BROKER = "tcp://127.0.0.1:5555"
_BROKER = BrokerConfig()  # the defaults of `mesh broker`, defined once in the core
BROKER_HELP = "Broker client endpoint (env MESH_BROKER)."


class MeshCallError(click.ClickException):
    """An error the mesh answered with; shown with its code."""

    exit_code = 1

    def __init__(self, err: MeshError) -> None:
        super().__init__(f"{int(err.code)} {type(err).__name__}: {err.message}")
        self.err = err


class UsageError(click.ClickException):
    exit_code = 2


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode()}
    raise TypeError(f"cannot show {type(value).__name__} as JSON")


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False, default=_json_default))


def _fail(err: MeshError) -> NoReturn:
    if isinstance(err, ConfigurationError):
        raise UsageError(err.message)
    raise MeshCallError(err)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _on_stop(stop: Any) -> None:
    """Call `stop()` on SIGTERM or SIGINT (Ctrl-C) so the process drains and exits cleanly."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="zmq-mcp-mesh")
def main() -> None:
    """mesh: the Machine Context Protocol as a ZeroMQ routing mesh."""


@main.command()
@click.option("--name", default="broker", show_default=True, help="Name shown in the registry and logs.")
@click.option("--clients", default="tcp://127.0.0.1:5555", show_default=True, help="Endpoint for AI-tool clients.")
@click.option("--nodes", default="tcp://127.0.0.1:5556", show_default=True, help="Endpoint for handler nodes.")
@click.option("--queue-limit", default=_BROKER.queue_limit, show_default=True, type=click.IntRange(1), help="Commands waiting for a free node before RESOURCE_EXHAUSTED.")
@click.option("--timeout", default=_BROKER.default_timeout, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Deadline in seconds for commands that carry none.")
@click.option("--max-message-bytes", default=_BROKER.max_message_bytes, show_default=True, type=click.IntRange(1), help="Largest message accepted.")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]), show_default=True)
def broker(name: str, clients: str, nodes: str, queue_limit: int, timeout: float, max_message_bytes: int, log_level: str) -> None:
    """Run a broker until SIGTERM or Ctrl-C; then drain in-flight commands and exit."""
    from .broker import BrokerConfig, BrokerServer, Endpoints

    _setup_logging(log_level)
    config = BrokerConfig(name=name, queue_limit=queue_limit, default_timeout=timeout, max_message_bytes=max_message_bytes)
    try:
        server = BrokerServer(Endpoints(clients, nodes), config)
    except MeshError as err:
        _fail(err)
    _on_stop(server.stop)
    tune_for_serving()
    click.echo(f"broker {name} ready clients={server.endpoints.clients} nodes={server.endpoints.nodes}")
    server.run()


@main.command()
@click.argument("use")
@click.option("--broker", "broker_ep", default="tcp://127.0.0.1:5556", show_default=True, help="Broker endpoint for nodes.")
@click.option("--config", "config_json", default="{}", envvar="MESH_NODE_CONFIG", help="The node's config as a JSON object (env MESH_NODE_CONFIG keeps secrets out of `ps`).")
@click.option("--name", default=None, help="Name in the registry (default: the node's own).")
@click.option("--capacity", default=None, type=click.IntRange(1), help="Commands run at once (default: the node's own).")
@click.option("--drain-timeout", default=10.0, show_default=True, type=click.FloatRange(min=0), help="Seconds to finish running commands after SIGTERM.")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]), show_default=True)
def node(
    use: str, broker_ep: str, config_json: str, name: str | None, capacity: int | None, drain_timeout: float, log_level: str
) -> None:
    """Run a handler node: USE is an installed node (echo, kv, sqlite, fs) or MODULE:ATTR."""
    from .plugins import load_node

    _setup_logging(log_level)
    try:
        config = json.loads(config_json)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--config is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise UsageError("--config must be a JSON object")
    try:
        n = load_node(use, config)
    except MeshError as err:
        _fail(err)
    if name:
        n.name = name
    if capacity:
        n.capacity = capacity
    _on_stop(n.stop)

    def announce() -> None:
        if n.registered.wait(timeout=None):
            services = sorted({svc for svc, _ in n.actions})
            click.echo(f"node {n.name} ready services={','.join(services)} broker={broker_ep}")

    threading.Thread(target=announce, daemon=True).start()
    tune_for_serving()
    try:
        n.run(broker_ep, drain_timeout=drain_timeout)
    except MeshError as err:
        _fail(err)
    # run() has answered every command; a handler thread still stuck in user code must
    # not keep the process alive past its drain (the interpreter would wait for it).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _client(broker_ep: str, timeout: float) -> Any:
    from .client import Client

    return Client(broker_ep, timeout=timeout)


@main.command()
@click.argument("target", metavar="SERVICE.ACTION")
@click.argument("payload", default="{}", required=False)
@click.option("--broker", "broker_ep", envvar="MESH_BROKER", default=DEFAULT_BROKER, show_default=True, help=BROKER_HELP)
@click.option("--timeout", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Seconds to wait, retries included.")
def call(target: str, payload: str, broker_ep: str, timeout: float) -> None:
    """Send a command and print its JSON result, e.g. `mesh call echo.echo '{"text": "hi"}'`."""
    service, dot, action = target.partition(".")
    if not dot or not service or not action:
        raise UsageError(f"target must be SERVICE.ACTION, got {target!r}")
    try:
        body = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise UsageError(f"payload is not JSON: {exc}") from None
    try:
        with _client(broker_ep, timeout) as client:
            result = client.call(service, action, body)
    except MeshError as err:
        _fail(err)
    _print_json(result)


@main.command()
@click.option("--broker", "broker_ep", envvar="MESH_BROKER", default=DEFAULT_BROKER, show_default=True, help=BROKER_HELP)
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
def services(broker_ep: str, timeout: float) -> None:
    """Print the registry: every service action with its description and JSON Schema."""
    try:
        with _client(broker_ep, timeout) as client:
            result = client.call("mesh", "services")
    except MeshError as err:
        _fail(err)
    _print_json(result)


@main.group()
def topology() -> None:
    """Work with topology files."""


@topology.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
def topology_check(file: str) -> None:
    """Validate FILE and list every problem with the key it is at."""
    from .topology import TopologyError, load

    try:
        topo = load(file)
    except TopologyError as err:
        raise UsageError(err.message) from None
    click.echo(
        f"{file}: ok ({len(topo.brokers)} broker(s), {sum(n.replicas for n in topo.nodes.values())} node process(es))"
    )


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
def up(file: str) -> None:
    """Start every broker and node of a topology; Ctrl-C or SIGTERM stops them all."""
    from .launcher import Launcher
    from .topology import TopologyError, load

    try:
        topo = load(file)
    except TopologyError as err:
        raise UsageError(err.message) from None
    launcher = Launcher(topo, echo=click.echo)
    _on_stop(launcher.stop)
    sys.exit(launcher.run())


@main.command()
@click.option("--clients", default=4, show_default=True, type=click.IntRange(1, 64), help="Client processes.")
@click.option("--inflight", default=32, show_default=True, type=click.IntRange(1, 10_000), help="Commands in flight per client.")
@click.option("--payload", default=256, show_default=True, type=click.IntRange(0, 1024 * 1024), help="Payload size in bytes.")
@click.option("--duration", default=5.0, show_default=True, type=click.FloatRange(min=0.5), help="Seconds measured per run.")
@click.option("--transport", default="tcp", show_default=True, type=click.Choice(["tcp", "ipc"]))
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report.")
def bench(clients: int, inflight: int, payload: int, duration: float, transport: str, as_json: bool) -> None:
    """Measure mesh throughput and latency against a raw pyzmq forwarding loop."""
    from .bench import BenchSettings, format_report, run_bench

    report = run_bench(BenchSettings(clients, inflight, payload, duration, transport))
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(format_report(report))


if __name__ == "__main__":  # pragma: no cover
    main()

