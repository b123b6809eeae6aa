"""The `mesh` command: each subcommand parses, calls the library, prints.

Errors are `click.ClickException`s with an exit code: 1 for an error the mesh answered
(printed with its code), 2 for bad usage or configuration.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, NoReturn

import click

from ..broker.config import BrokerConfig
from ..broker.settings import LIMITS, SETTINGS, BrokerSettings, Setting, parse_retention
from ..process import tune_for_serving
from ..protocol import AuthenticationFailedError, ConfigurationError, MeshError

DEFAULT_BROKER = "tcp://127.0.0.1:5555"
_BROKER = BrokerConfig()  # the defaults of `mesh broker`, defined once in the core
BROKER_HELP = "Broker client endpoint (env MESH_BROKER); a comma list tries each broker of a cluster in turn."


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


def _json_payload(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"payload is not JSON: {exc}") from None


def _fail(err: MeshError) -> NoReturn:
    if isinstance(err, ConfigurationError):
        raise UsageError(err.message)
    raise MeshCallError(err)


DISTRIBUTION = "zmq-mcp-mesh"


def _need_extra(module: str, extra: str, command: str) -> None:
    """Stop with the install command when an optional extra `command` needs is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise click.ClickException(f"`mesh {command}` needs the {extra!r} extra: pip install '{DISTRIBUTION}[{extra}]'")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, message (and exc if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


LOG_FORMATS = ("text", "json")
log_format_option = click.option(
    "--log-format", default="text", type=click.Choice(LOG_FORMATS), show_default=True,
    help="text for people, json for one JSON object per line (ts, level, logger, message).",
)


def _setup_logging(level: str, fmt: str = "text") -> None:
    """Log to stderr at `level`, as text lines or JSON lines (`fmt`)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


def _on_stop(stop: Any) -> None:
    """Call `stop()` on SIGTERM or SIGINT (Ctrl-C) so the process drains and exits cleanly."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="zmq-mcp-mesh")
def main() -> None:
    """mesh: the Machine Context Protocol as a ZeroMQ routing mesh."""


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
        from ..security.brokerside import broker_security

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
    return BrokerServer(Endpoints(s.clients, s.nodes, s.events), s.limits, **options)


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


def _levels(items: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        service, _, level = item.partition("=")
        if not service or level not in ("0", "1", "2", "3"):
            raise UsageError(f"--service-level must be SERVICE=LEVEL with a level from 0 to 3, got {item!r}")
        out[service] = int(level)
    return out


# The clients whose files `find_credentials` looks for in the default state directory:
# mesh.security.state's ADMIN_CLIENT and BRIDGE_CLIENT (not imported, so the CLI starts fast).
ADMIN_CLIENT, BRIDGE_CLIENT = "dev", "bridge"
ADMIN_CREDENTIALS = f"var/mesh/credentials/{ADMIN_CLIENT}.toml"
BRIDGE_CREDENTIALS = f"var/mesh/credentials/{BRIDGE_CLIENT}.toml"


def _endpoints(value: str) -> list[str]:
    """The endpoints of a `--broker` value: one, or a comma list (a cluster's brokers)."""
    endpoints = [e.strip() for e in value.split(",")]
    if not all(endpoints):
        raise UsageError(f"--broker has an empty endpoint: {value!r}")
    return endpoints


_SOURCES = {"given": "given with --credentials", "env": "from MESH_CREDENTIALS", "state": "found in the state directory"}


def _explained(err: AuthenticationFailedError, found: Any, names: tuple[str, ...]) -> AuthenticationFailedError:
    """`err` (the broker refused the link or its token) with the credentials file tried
    (`found`, from `find_credentials` with `names`) and how to choose another."""
    from ..security.credentials import DEFAULT_STATE

    if found.unused is not None:
        tried = (f"no credentials were used (none given with --credentials or MESH_CREDENTIALS; {found.unused} is not "
                 f"used because {DEFAULT_STATE}/brokers/ records no broker at this address)")
    elif found.path is None:
        files = " or ".join(f"{DEFAULT_STATE}/credentials/{name}.toml" for name in names)
        tried = f"no credentials were used (none given with --credentials or MESH_CREDENTIALS, and no {files} here)"
    else:
        tried = f"credentials tried: {found.path} ({_SOURCES[found.source]})"
    message = f"{err.message}; {tried}; choose a credentials file with --credentials FILE or MESH_CREDENTIALS=FILE"
    return AuthenticationFailedError(message, details={**err.details, "credentials": str(found.path) if found.path else None})


def _recorded(broker_ep: str) -> list[str] | None:
    """The endpoints the state directory must record for its credentials to be used; None
    (any) for the quickstart's address, which always used them."""
    return None if broker_ep == DEFAULT_BROKER else _endpoints(broker_ep)


@contextlib.contextmanager
def _client(broker_ep: str, timeout: float, credentials: str | None = None) -> Iterator[Any]:
    """A client of `broker_ep` with the credentials `find_credentials` chooses; a refused handshake
    (or token) is reported with the file tried."""
    from ..client import Client
    from ..security.credentials import find_credentials, load_credentials

    found = find_credentials(credentials, names=(ADMIN_CLIENT,), brokers=_recorded(broker_ep))
    creds = load_credentials(found.path) if found.path is not None else None
    try:
        with Client(_endpoints(broker_ep), timeout=timeout, credentials=creds) as client:
            yield client
    except AuthenticationFailedError as err:
        raise _explained(err, found, (ADMIN_CLIENT,)) from None


credentials_option = click.option(
    "--credentials",
    type=click.Path(dir_okay=False),
    default=None,
    help=f"Security on: the credentials file (default: MESH_CREDENTIALS, else {ADMIN_CREDENTIALS} when var/mesh records the broker).",
)


@main.command()
@click.argument("target", metavar="SERVICE.ACTION")
@click.argument("payload", default="{}", required=False)
@click.option("--broker", "broker_ep", envvar="MESH_BROKER", default=DEFAULT_BROKER, show_default=True, help=BROKER_HELP)
@click.option("--timeout", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Seconds to wait, retries included.")
@credentials_option
def call(target: str, payload: str, broker_ep: str, timeout: float, credentials: str | None) -> None:
    """Send a command and print its JSON result, e.g. `mesh call echo.echo '{"text": "hi"}'`."""
    service, dot, action = target.partition(".")
    if not dot or not service or not action:
        raise UsageError(f"target must be SERVICE.ACTION, got {target!r}")
    body = _json_payload(payload)
    try:
        with _client(broker_ep, timeout, credentials) as client:
            result = client.call(service, action, body)
    except MeshError as err:
        _fail(err)
    _print_json(result)


@main.command()
@click.option("--broker", "broker_ep", envvar="MESH_BROKER", default=DEFAULT_BROKER, show_default=True, help=BROKER_HELP)
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@credentials_option
def services(broker_ep: str, timeout: float, credentials: str | None) -> None:
    """Print the registry: every service action with its description and JSON Schema."""
    try:
        with _client(broker_ep, timeout, credentials) as client:
            result = client.services()
    except MeshError as err:
        _fail(err)
    _print_json(result)


@main.command("mcp")
@click.option("--broker", "broker_ep", envvar="MESH_BROKER", default=DEFAULT_BROKER, show_default=True, help=BROKER_HELP)
@click.option("--credentials", type=click.Path(dir_okay=False), default=None,
              help=f"Security on: the bridge's credentials (default: MESH_CREDENTIALS, else {BRIDGE_CREDENTIALS} or {ADMIN_CREDENTIALS}, the first that exists, when var/mesh records the broker).")
@click.option("--include", multiple=True, metavar="GLOB", help="Expose only tools whose name (service.action) matches (repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Never expose tools whose name matches (repeatable; beats --include).")
@click.option("--timeout", default=30.0, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Seconds one tool call may take.")
@click.option("--http", "http_address", default=None, metavar="HOST:PORT", help="Serve streamable HTTP at http://HOST:PORT/mcp instead of stdio.")
@click.option("--token-file", default=None, type=click.Path(dir_okay=False, exists=True), help="With --http: the bearer token clients must send (required off loopback).")
@click.option("--tls-cert", default=None, type=click.Path(dir_okay=False), help="With --http: serve HTTPS (TLS 1.3 minimum) with this certificate (PEM, the chain after it). Needs --tls-key.")
@click.option("--tls-key", default=None, type=click.Path(dir_okay=False), help="With --http: the certificate's private key (PEM, unencrypted).")
@click.option("--log-level", default="warning", type=click.Choice(["debug", "info", "warning", "error"]), show_default=True)
@log_format_option
def mcp(broker_ep: str, credentials: str | None, include: tuple[str, ...], exclude: tuple[str, ...], timeout: float,
        http_address: str | None, token_file: str | None, tls_cert: str | None, tls_key: str | None,
        log_level: str, log_format: str) -> None:
    """Run the MCP bridge: every service action the bridge may call, as a tool for AI clients (docs/mcp.md)."""
    import asyncio

    _need_extra("mcp", "mcp", "mcp")

    from ..client import AsyncClient
    from ..mcp.bridge import Bridge
    from ..mcp.serve import serve_http, serve_stdio
    from ..mcp.tools import Selection
    from ..monitor.server import tls_context
    from ..security.credentials import find_credentials, load_credentials

    _setup_logging(log_level, log_format)  # stderr: on stdio, stdout carries the protocol
    if (token_file is not None or tls_cert is not None or tls_key is not None) and http_address is None:
        raise UsageError("--token-file, --tls-cert and --tls-key go with --http")
    try:
        tls = tls_context(tls_cert, tls_key)
    except MeshError as err:
        _fail(err)
    host, port = _host_port(http_address) if http_address is not None else ("", 0)
    token = None
    if token_file is not None:
        token = open(token_file, encoding="utf-8").read().strip()
        if not token:
            raise UsageError(f"{token_file} is empty")

    found = find_credentials(credentials, names=(BRIDGE_CLIENT, ADMIN_CLIENT), brokers=_recorded(broker_ep))

    async def run() -> None:
        creds = load_credentials(found.path) if found.path is not None else None
        client = AsyncClient(broker_ep, timeout=timeout, credentials=creds)
        bridge = Bridge(client, selection=Selection(include, exclude), timeout=timeout)
        if http_address is None:
            await serve_stdio(bridge)
        else:
            await serve_http(bridge, host, port, token, tls=tls,
                             ready=lambda url: click.echo(f"mcp bridge ready url={url} tools={len(bridge.tools)}"))

    tune_for_serving()  # after the SDK's imports: its objects leave the collector's way
    try:
        asyncio.run(run())
    except AuthenticationFailedError as err:
        _fail(_explained(err, found, (BRIDGE_CLIENT, ADMIN_CLIENT)))
    except MeshError as err:
        _fail(err)
    except KeyboardInterrupt:
        pass


def _host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--http must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


@main.group()
def events() -> None:
    """Publish and subscribe to events."""


@events.command("publish")
@click.argument("topic")
@click.argument("payload", default="null", required=False)
@click.option("--broker", "broker_ep", envvar="MESH_BROKER", default=DEFAULT_BROKER, show_default=True, help=BROKER_HELP)
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@credentials_option
def events_publish(topic: str, payload: str, broker_ep: str, timeout: float, credentials: str | None) -> None:
    """Publish a JSON payload on TOPIC and print the sequence number it got."""
    body = _json_payload(payload)
    try:
        with _client(broker_ep, timeout, credentials) as client:
            seq = client.publish(topic, body)
    except MeshError as err:
        _fail(err)
    _print_json({"topic": topic, "seq": seq})


@events.command("subscribe")
@click.argument("prefix", default="")
@click.option("--from", "from_seq", type=click.IntRange(0), default=None, help="Replay the retained events after this sequence number first.")
@click.option("--count", type=click.IntRange(1), default=None, help="Exit after this many events.")
@click.option("--broker", "broker_ep", envvar="MESH_BROKER", default=DEFAULT_BROKER, show_default=True, help=BROKER_HELP)
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Seconds to wait for the broker to confirm.")
@credentials_option
def events_subscribe(prefix: str, from_seq: int | None, count: int | None, broker_ep: str, timeout: float, credentials: str | None) -> None:
    """Print one JSON line per event of PREFIX (every topic when omitted) until Ctrl-C.

    Gaps (events this subscriber missed) are printed as JSON lines on stderr.
    """
    from ..subscription import Gap

    try:
        with _client(broker_ep, timeout, credentials) as client, client.subscribe(prefix, from_seq) as sub:
            seen = 0
            for item in sub:
                if isinstance(item, Gap):
                    gap = {"gap": {"topic": item.topic, "first": item.first, "last": item.last, "reason": item.reason}}
                    click.echo(json.dumps(gap), err=True)
                    continue
                line = {"topic": item.topic, "seq": item.seq, "id": item.id, "ts": item.timestamp,
                        "payload": item.payload}
                if item.metadata:
                    line["metadata"] = item.metadata
                click.echo(json.dumps(line, ensure_ascii=False, default=_json_default))
                seen += 1
                if count is not None and seen >= count:
                    return
    except MeshError as err:
        _fail(err)
    except KeyboardInterrupt:
        return


_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _ttl(value: str) -> float:
    """`90`, `90s`, `15m`, `1h`, `30d` -> seconds."""
    number, unit = (value[:-1], value[-1]) if value and value[-1] in _TTL_UNITS else (value, "s")
    try:
        seconds = float(number) * _TTL_UNITS[unit]
    except ValueError:
        raise UsageError(f"--ttl must be a duration like 90s, 15m, 1h or 30d, got {value!r}") from None
    if seconds <= 0:
        raise UsageError("--ttl must be positive")
    return seconds


state_option = click.option(
    "--state", "state_dir", default="var/mesh", show_default=True, type=click.Path(file_okay=False),
    help="The security state directory (`[security] state` of the topology).",
)


@main.group()
def keys() -> None:
    """Make and rotate keys."""


@keys.command("curve")
@click.argument("name")
@click.option("--dir", "directory", default=".", show_default=True, type=click.Path(file_okay=False), help="Where to write NAME.key and NAME.key_secret.")
def keys_curve(name: str, directory: str) -> None:
    """Make a CURVE key pair in ZeroMQ's certificate format; copy NAME.key to curve/allowed/ to admit it."""
    from ..security.curve import create_keypair

    os.makedirs(directory, exist_ok=True)
    try:
        public, secret = create_keypair(directory, name)
    except MeshError as err:
        _fail(err)
    _print_json({"public": str(public), "secret": str(secret)})


@keys.command("rotate")
@state_option
@click.option("--grace", default=600.0, show_default=True, type=click.FloatRange(min=0), help="Seconds the old key still decrypts after the switch.")
@click.option("--delay", default=5.0, show_default=True, type=click.FloatRange(min=0), help="Seconds before the new key encrypts (longer than readers' 1 s reload).")
def keys_rotate(state_dir: str, grace: float, delay: float) -> None:
    """Add a payload key to the key ring; it takes over after --delay, the old one retires after --grace."""
    import time

    from ..security.payload import KeyRing

    path = os.path.join(state_dir, "keyring.json")
    try:
        ring = KeyRing.load(path)
        now = time.time()
        pruned = ring.prune(now)
        kid = ring.rotate(now, grace, delay)
        ring.save(path)
    except MeshError as err:
        _fail(err)
    _print_json({"new_key": kid, "active_from": now + delay, "pruned": pruned})


@main.group()
def token() -> None:
    """Issue and revoke tokens."""


@token.command("issue")
@state_option
@click.option("--sub", "subject", required=True, help="Who the token is for: the name of that client's CURVE key.")
@click.option("--role", "roles", multiple=True, required=True, help="A role of the policy (repeatable).")
@click.option("--ttl", default="1h", show_default=True, help="Lifetime: 90s, 15m, 1h, 30d.")
def token_issue(state_dir: str, subject: str, roles: tuple[str, ...], ttl: str) -> None:
    """Print a token signed with the state directory's secret."""
    import time

    from ..security.state import issue_token

    try:
        click.echo(issue_token(state_dir, subject, roles, _ttl(ttl), time.time()))
    except MeshError as err:
        _fail(err)


@token.command("revoke")
@click.argument("jti")
@click.option("--broker", "broker_ep", envvar="MESH_BROKER", default=DEFAULT_BROKER, show_default=True, help=BROKER_HELP)
@credentials_option
def token_revoke(jti: str, broker_ep: str, credentials: str | None) -> None:
    """Revoke the token with id JTI at the broker (persisted); needs a role that may call mesh.revoke."""
    try:
        with _client(broker_ep, 5.0, credentials) as client:
            _print_json(client.call("mesh", "revoke", {"jti": jti}))
    except MeshError as err:
        _fail(err)


@main.group()
def policy() -> None:
    """Change a broker cluster's access policy."""


@policy.command("set")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--broker", "broker_ep", envvar="MESH_BROKER", default=DEFAULT_BROKER, show_default=True, help=BROKER_HELP)
@credentials_option
def policy_set(file: str, broker_ep: str, credentials: str | None) -> None:
    """Put the policy in FILE (TOML, like the state directory's policy.toml) in force on
    every broker of the cluster, once committed; needs a role that may call mesh.policy."""
    from pathlib import Path

    try:
        text = Path(file).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise click.ClickException(f"{file} is not UTF-8 text") from None
    try:
        with _client(broker_ep, 10.0, credentials) as client:
            _print_json(client.call("mesh", "policy", {"policy": text}))
    except MeshError as err:
        _fail(err)


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


BENCHMARKS = ("failover", "mcp", "cluster", "events", "security", "monitor")  # each has its --flag; none: commands
_COMMAND_OPTIONS = ("clients", "inflight", "payload", "duration", "transport")
# The options each benchmark reads: one given on the command line that it would ignore is refused.
BENCH_OPTIONS: dict[str, tuple[str, ...]] = {
    "command": _COMMAND_OPTIONS,
    "security": _COMMAND_OPTIONS,
    "monitor": _COMMAND_OPTIONS,
    "cluster": _COMMAND_OPTIONS,
    "events": ("subscribers", "payload", "duration", "transport"),
    "mcp": ("payload", "duration"),  # one driving process, 16 in flight as the issue's bar says, loopback TCP
    "failover": ("nodes", "rounds", "signals", "heartbeat", "callers", "work", "plain_share", "seed"),
}


@main.command()
@click.option("--events", "events_bench", is_flag=True, help="Measure event delivery to subscribers instead of commands.")
@click.option("--security", "security_bench", is_flag=True, help="Measure commands with each security layer on, as a ratio of security off.")
@click.option("--monitor", "monitor_bench", is_flag=True, help="Measure commands with the monitor on and polled, as a ratio of the monitor off.")
@click.option("--cluster", "cluster_bench", is_flag=True, help="Measure exactly-once commands and committed log entries in a 3-broker cluster, as a ratio of plain commands.")
@click.option("--mcp", "mcp_bench", is_flag=True, help="Measure echo calls through the MCP bridge over stdio and HTTP against the MCP SDK's in-process floor and the direct mesh client (docs/mcp.md).")
@click.option("--failover", "failover_bench", is_flag=True, help="Measure how fast a killed or stopped node is noticed and its calls recovered, under load (docs/reliability.md).")
@click.option("--subscribers", default="1,10,100", show_default=True, help="With --events: subscriber counts, one pair of runs each.")
@click.option("--clients", default=4, show_default=True, type=click.IntRange(1, 64), help="Client processes.")
@click.option("--inflight", default=32, show_default=True, type=click.IntRange(1, 10_000), help="Commands in flight per client.")
@click.option("--payload", default=256, show_default=True, type=click.IntRange(0, 1024 * 1024), help="Payload size in bytes.")
@click.option("--duration", default=5.0, show_default=True, type=click.FloatRange(min=0.5), help="Seconds measured per run.")
@click.option("--transport", default="tcp", show_default=True, type=click.Choice(["tcp", "ipc"]))
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
    report, text = _run_benchmark(kind, options)
    click.echo(json.dumps(report, indent=2) if as_json else text)


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
        report = run_events_bench(EventBenchSettings(counts, o["payload"], o["duration"], transport=o["transport"]))
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
    from ..bench.common import BenchSettings

    settings = BenchSettings(o["clients"], o["inflight"], o["payload"], o["duration"], o["transport"])
    if kind == "security":
        from ..bench.security import format_security_report, run_security_bench

        report = run_security_bench(settings)
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

    report = run_bench(settings)
    return report, format_report(report)


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



if __name__ == "__main__":  # pragma: no cover
    main()

