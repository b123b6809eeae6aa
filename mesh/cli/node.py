"""`mesh node`: run one handler node until SIGTERM."""

from __future__ import annotations

import json
import os
import sys
import threading

import click

from ..process import tune_for_serving
from ..protocol import MeshError
from .base import UsageError, _endpoints, _fail, _on_stop, _setup_logging, log_format_option, main


@main.command()
@click.argument("use")
@click.option("--broker", "broker_ep", default="tcp://127.0.0.1:5556", show_default=True, help="Broker endpoint for nodes; a comma list for every broker of a cluster.")
@click.option("--config", "config_json", default="{}", envvar="MESH_NODE_CONFIG", help="The node's config as a JSON object (env MESH_NODE_CONFIG keeps secrets out of `ps`).")
@click.option("--name", default=None, help="Name in the registry (default: the node's own).")
@click.option("--capacity", default=None, type=click.IntRange(1), help="Commands run at once (default: the node's own).")
@click.option("--heartbeat-interval", default=None, type=click.FloatRange(min=0, min_open=True), help="Seconds between heartbeats; the broker declares the node dead after 3 missed (default: the node's own, 1 s for the ready nodes).")
@click.option("--drain-timeout", default=10.0, show_default=True, type=click.FloatRange(min=0), help="Seconds to finish running commands after SIGTERM.")
@click.option("--no-dedupe", is_flag=True, help="Keep no table of recent command ids (a resend runs again): for tests of the brokers' exactly-once only.")
@click.option("--credentials", envvar="MESH_CREDENTIALS", type=click.Path(dir_okay=False), default=None, help="Security on: this node's credentials file (env MESH_CREDENTIALS).")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]), show_default=True)
@log_format_option
def node(
    use: str,
    broker_ep: str,
    config_json: str,
    name: str | None,
    capacity: int | None,
    heartbeat_interval: float | None,
    drain_timeout: float,
    no_dedupe: bool,
    credentials: str | None,
    log_level: str,
    log_format: str,
) -> None:
    """Run a handler node: USE is an installed node (echo, kv, sqlite, fs) or MODULE:ATTR."""
    from ..plugins import load_node

    _setup_logging(log_level, log_format)
    try:
        config = json.loads(config_json)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--config is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise UsageError("--config must be a JSON object")
    try:
        n = load_node(use, config)
        creds = None
        if credentials is not None:
            from ..security.credentials import load_credentials

            creds = load_credentials(credentials)
    except MeshError as err:
        _fail(err)
    if name:
        n.name = name
    if capacity:
        n.capacity = capacity
    if heartbeat_interval:
        n.heartbeat_interval = heartbeat_interval
    if no_dedupe:
        n.dedupe = False
    _on_stop(n.stop)

    def announce() -> None:
        if n.registered.wait(timeout=None):
            services = sorted({svc for svc, _ in n.actions})
            click.echo(f"node {n.name} ready services={','.join(services)} broker={broker_ep}")

    threading.Thread(target=announce, daemon=True).start()
    tune_for_serving()
    try:
        n.run(_endpoints(broker_ep), drain_timeout=drain_timeout, credentials=creds)
    except MeshError as err:
        _fail(err)
    # run() has answered every command; a handler thread still stuck in user code must
    # not keep the process alive past its drain (the interpreter would wait for it).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
