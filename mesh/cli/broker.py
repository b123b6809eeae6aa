"""`mesh broker`: its flags, made from the one description of each setting
(mesh.broker.settings), or its settings from a topology file."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import click

from ..broker.config import BrokerConfig
from ..broker.settings import LIMITS, SETTINGS, BrokerSettings, Setting, parse_retention
from ..process import return_freed_memory, tune_for_serving
from ..protocol import ConfigurationError, MeshError
from .base import UsageError, _fail, _on_stop, _setup_logging, log_format_option, main

_BROKER = BrokerConfig()  # the defaults of `mesh broker`, defined once in the core


def _retention_rule(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> tuple[Any, ...]:
    try:
        return tuple(parse_retention(v) for v in values)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _broker_option(s: Setting) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The flag of one broker setting, made from its one description (mesh.broker.settings)."""
    kind: Any = s.kind
    if s.choices:
        kind = click.Choice(s.choices)
    elif s.path is not None:
        kind = click.Path(file_okay=s.path == "file", dir_okay=s.path == "dir")
    elif s.positive:
        kind = click.IntRange(1) if s.kind is int else click.FloatRange(min=0, min_open=True)
    elif s.minimum is not None or s.maximum is not None:
        kind = click.IntRange(s.minimum, s.maximum)
    return click.option(
        s.option, s.key, type=kind, default=s.default, multiple=s.repeat, metavar=s.metavar, help=s.help,
        show_default=s.default not in (None, ()), callback=_retention_rule if s.key == "retention" else None,
    )


def _broker_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Every flag of `SETTINGS`, in its order, on `command`."""
    for s in reversed(SETTINGS):
        command = _broker_option(s)(command)
    return command


@main.command()
@click.option("--topology", "topology_file", type=click.Path(dir_okay=False), default=None,
              help="Take this broker's settings from a topology file: its [brokers.NAME] table (NAME from --name), "
                   "[security] and [cluster], as `mesh up` does. Flags for what the topology holds are refused.")
@click.option("--name", default="broker", show_default=True, help="Name shown in the registry and logs; with --topology, which broker to run.")
@_broker_options
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]), show_default=True)
@log_format_option
@click.pass_context
def broker(ctx: click.Context, topology_file: str | None, name: str, log_level: str, log_format: str, **values: Any) -> None:
    """Run a broker until SIGTERM or Ctrl-C; then drain in-flight commands and exit.

    With --topology FILE --name NAME, the settings come from the topology (docs/topologies.md).
    With --state, security is on: CURVE on every socket, tokens, the access policy.
    With --monitor, it also serves the dashboard and monitoring endpoints over HTTP.
    """
    _setup_logging(log_level, log_format)
    try:
        if topology_file is not None:
            settings = _topology_settings(ctx, topology_file, name, values)
        else:
            settings = _flag_settings(name, values)
        server = _broker_server(settings)
    except MeshError as err:
        _fail(err)
    _on_stop(server.stop)
    tune_for_serving()
    return_freed_memory()  # what clients that left held goes back to the system
    ep = server.endpoints
    if settings.state is not None:
        _record(settings.state, ep.clients)
    if server.monitor is not None:
        click.echo(f"broker {settings.name} monitor {server.monitor.url}")
    click.echo(f"broker {settings.name} ready clients={ep.clients} nodes={ep.nodes} events={ep.events}")
    server.run()


def _topology_settings(ctx: click.Context, file: str, name: str, values: dict[str, Any]) -> BrokerSettings:
    """Broker `name` of the topology `file`; a flag for a setting the topology holds is refused,
    so the broker never runs other settings than the processes that read the same file."""
    from click.core import ParameterSource

    from ..topology import TopologyError, load

    given = [s.option for s in SETTINGS if s.topology is not None and ctx.get_parameter_source(s.key) is ParameterSource.COMMANDLINE]
    if given:
        held = "this setting" if len(given) == 1 else "these settings"
        raise UsageError(f"{', '.join(given)}: {file} holds {held}; change it there, or run without --topology "
                         "(a flag next to it would make this broker differ from what the rest of the mesh reads there)")
    try:
        topo = load(file)
    except TopologyError as err:
        raise UsageError(err.message) from None
    if ctx.get_parameter_source("name") is not ParameterSource.COMMANDLINE or name not in topo.brokers:
        given_name = f" ({name!r} is not one)" if ctx.get_parameter_source("name") is ParameterSource.COMMANDLINE else ""
        raise UsageError(f"--topology needs --name NAME, one of its brokers: {', '.join(topo.brokers)}{given_name}")
    return replace(topo.broker_settings(name), **{s.key: values[s.key] for s in SETTINGS if s.topology is None})


def _flag_settings(name: str, values: dict[str, Any]) -> BrokerSettings:
    """The settings of a broker run without a topology, from its flags."""
    limits = BrokerConfig(name=name, retention=values.pop("retention") or _BROKER.retention,
                          **{s.core or s.key: values.pop(s.key) for s in LIMITS})
    values["service_levels"] = _levels(values["service_levels"])
    if values["members"]:
        values["members"] = _members(name, values["members"], values["learners"], values["data"])
    return BrokerSettings(limits, **values)


def _broker_server(settings: BrokerSettings) -> Any:
    """The `BrokerServer` that `settings` describe, with errors that say what to fix.

    Raises:
        UsageError: a setting needs another that is not set.
        MeshError: a file or an address in the settings is missing or unusable.
    """
    from ..broker.loop import BrokerServer, ClusterSettings, Endpoints

    s = settings
    options: dict[str, Any] = {}
    if s.state is not None:
        from ..broker.secure import broker_security

        setup = broker_security(s.state, min_level=s.min_level, service_levels=s.service_levels, allow_ips=s.allow_ips,
                                deny_ips=s.deny_ips, token_algorithm=s.token_algorithm, token_key=s.token_key)  # type: ignore[arg-type]
        options = {"security": setup.security, "secure": setup.secure, "zap": setup.zap}
    elif s.service_levels or s.allow_ips or s.deny_ips:
        raise UsageError("--service-level, --allow-ip and --deny-ip need --state (security on)")
    if s.monitor is not None:
        from ..monitor.server import monitor_settings

        options["monitor"] = monitor_settings(s.monitor, s.monitor_token_file, s.state,
                                              tls_cert=s.monitor_tls_cert, tls_key=s.monitor_tls_key)
    elif s.monitor_token_file is not None or s.monitor_tls_cert is not None or s.monitor_tls_key is not None:
        raise UsageError("--monitor-token-file, --monitor-tls-cert and --monitor-tls-key need --monitor")
    if s.members:
        ticks = {} if s.election_ticks is None else {"election_ticks": s.election_ticks}
        options["cluster"] = ClusterSettings(s.members, s.data or "", frozenset(s.learners), state_dir=s.state, **ticks)
    elif s.learners or s.data is not None:
        raise UsageError("--learner and --data need --member (cluster on)")
    return BrokerServer(Endpoints(s.clients, s.nodes, s.events), s.limits, backlog=s.backlog, io_threads=s.io_threads,
                        **options)


def _record(state_dir: str, clients: str) -> None:
    """Record the broker's client endpoint in its state directory, so that `mesh call`
    there finds the credentials for this address; a broker runs on without it."""
    from ..security.credentials import record_broker

    try:
        record_broker(state_dir, clients)
    except ConfigurationError as err:
        logging.getLogger("mesh.broker").warning("%s: mesh call will not find this broker's credentials by itself", err.message)


def _members(name: str, members: tuple[str, ...], learners: tuple[str, ...], data_dir: str | None) -> dict[str, str]:
    """The `--member` table (name -> peer endpoint), with errors that say what to fix."""
    table: dict[str, str] = {}
    for item in members:
        member, sep, endpoint = item.partition("=")
        if not sep or not member or not endpoint.startswith(("tcp://", "ipc://")):
            raise UsageError(f"--member {item!r}: expected NAME=tcp://HOST:PORT")
        if member in table:
            raise UsageError(f"--member {member!r} is given twice")
        table[member] = endpoint
    if name not in table:
        raise UsageError(f"--member must list this broker too (--name {name!r})")
    unknown = sorted(set(learners) - set(table))
    if unknown:
        raise UsageError(f"--learner {', '.join(unknown)}: not a --member")
    if data_dir is None:
        raise UsageError("a cluster member needs --data DIR for its replicated log")
    return table


def _levels(items: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        service, _, level = item.partition("=")
        if not service or level not in ("0", "1", "2", "3"):
            raise UsageError(f"--service-level must be SERVICE=LEVEL with a level from 0 to 3, got {item!r}")
        out[service] = int(level)
    return out
