"""Interim `mesh up FILE --host NAME` for the fault suite, until the `hosts` work lands on main.

    python -m mesh.faults.hostup FILE --prepare      # keys, tokens, policy: once, first
    python -m mesh.faults.hostup FILE --host h1      # h1's brokers and nodes, supervised

It reads the agreed `[hosts]` / `host = ...` keys of a topology, drops them, and runs the
rest with `mesh up`'s own `Launcher`, keeping only the named host's processes. Nodes of a
host without brokers get every broker's node endpoint from the file.
"""

from __future__ import annotations

import signal
import sys
import tomllib
from pathlib import Path

import click

from ..launcher import Launcher
from ..topology import parse


@click.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--host", default=None)
@click.option("--prepare", is_flag=True)
def main(file: str, host: str | None, prepare: bool) -> None:
    """Start HOST's part of FILE (or only make its security state with --prepare)."""
    raw = tomllib.loads(Path(file).read_text())
    raw.pop("hosts", None)
    placed = {}
    for kind in ("brokers", "nodes"):
        for name, spec in raw.get(kind, {}).items():
            placed[(kind, name)] = spec.pop("host", None)
    topo = parse(raw, file)
    launcher = Launcher(topo, echo=lambda line: click.echo(line))
    launcher.prepare_security()
    if prepare:
        return
    keep = {f"broker:{n}" for (k, n), h in placed.items() if k == "brokers" and h == host}
    nodes = {n for (k, n), h in placed.items() if k == "nodes" and h == host}
    launcher.processes = [p for p in launcher.processes if p.name in keep or (not p.is_broker and p.spec in nodes)]
    launcher.node_endpoints = {b.name: b.nodes for b in topo.brokers.values()}
    signal.signal(signal.SIGTERM, lambda *_: launcher.stop())
    signal.signal(signal.SIGINT, lambda *_: launcher.stop())
    sys.exit(launcher.run())


if __name__ == "__main__":
    main()
