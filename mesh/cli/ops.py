"""Running a mesh: `mesh init`, `mesh up`, `mesh topology check` and `mesh top`."""

from __future__ import annotations

import os
import sys

import click

from ..protocol import MeshError
from .base import UsageError, _fail, _need_extra, _on_stop, main


@main.group()
def topology() -> None:
    """Work with topology files."""


@topology.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
def topology_check(file: str) -> None:
    """Validate FILE and list every problem with the key it is at."""
    from ..topology import TopologyError, load

    try:
        topo = load(file)
    except TopologyError as err:
        raise UsageError(err.message) from None
    where = f" on {len(topo.hosts)} host(s)" if topo.hosts else ""
    click.echo(
        f"{file}: ok ({len(topo.brokers)} broker(s), {sum(n.replicas for n in topo.nodes.values())} node process(es){where})"
    )
    for host in topo.hosts.values():
        parts = [f"broker {b.name}" for b in topo.brokers.values() if b.host == host.name]
        parts += [f"node {n.name}" + (f" x{n.replicas}" if n.replicas > 1 else "") for n in topo.nodes.values() if n.host == host.name]
        click.echo(f"  {host.name} ({host.address}): {', '.join(parts) or 'nothing (clients only)'}")


@main.command()
@click.argument("directory", default=".", type=click.Path(file_okay=False))
def init(directory: str) -> None:
    """Write a ready quickstart into DIRECTORY (default: here): mesh.toml, sample data, a README.

    Then `mesh up` in DIRECTORY starts it with security on, as `make run` does in the repository.
    """
    from pathlib import Path

    from ..quickstart import init as write_quickstart

    try:
        for line in write_quickstart(Path(directory)):
            click.echo(line)
    except MeshError as err:
        raise UsageError(err.message) from None
    click.echo(f"next: cd {directory} && mesh up    (then, in another terminal there: mesh call echo.echo '{{\"text\": \"hi\"}}')")


@main.command()
@click.argument("file", default="mesh.toml", type=click.Path(dir_okay=False))
@click.option("--host", default=None, metavar="NAME", help="Run only the brokers and nodes the topology's [hosts] places on NAME (one mesh up per machine).")
def up(file: str, host: str | None) -> None:
    """Start every broker and node of a topology FILE (default: mesh.toml, as `mesh init` writes), or of one host; Ctrl-C or SIGTERM stops them all."""
    from ..launcher import Launcher
    from ..topology import TopologyError, load

    try:
        topo = load(file)
    except TopologyError as err:
        raise UsageError(err.message) from None
    try:
        launcher = Launcher(topo, echo=click.echo, host=host)
        launcher.prepare_security()
    except MeshError as err:
        _fail(err)
    _on_stop(launcher.stop)
    sys.exit(launcher.run())


DEFAULT_MONITOR_TOKEN = "var/mesh/monitor.token"  # what `mesh broker --state var/mesh --monitor ...` writes


@main.command()
@click.option("--monitor", "monitor_url", default="http://127.0.0.1:8222", show_default=True, help="The broker monitor's address.")
@click.option("--token-file", default=None, type=click.Path(dir_okay=False), help="The monitor's bearer token (default var/mesh/monitor.token when it exists).")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(min=0.1), help="Seconds between refreshes.")
def top(monitor_url: str, token_file: str | None, interval: float) -> None:
    """Show brokers and nodes live (state, heartbeat, load, throughput, errors) until Ctrl-C.

    Exits with 2 when the monitor cannot be reached or refuses the token at start;
    later failures are shown above the last snapshot while it keeps retrying.
    """
    _need_extra("rich", "top", "top")
    from ..monitor.top import MonitorUnavailableError, watch

    path = token_file
    if path is None and os.path.exists(DEFAULT_MONITOR_TOKEN):
        path = DEFAULT_MONITOR_TOKEN
    token = None
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                token = f.read().strip() or None
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the token file {path}: {exc}") from None
    try:
        watch(monitor_url, token, interval)
    except MonitorUnavailableError as exc:
        raise UsageError(str(exc)) from None
