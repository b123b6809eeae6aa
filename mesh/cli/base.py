"""What every `mesh` subcommand shares: the click group `main`, the errors and their exit
codes, JSON output, logging, signal handling, and finding a broker's credentials.

Errors are `click.ClickException`s with an exit code: 1 for an error the mesh answered
(printed with its code), 2 for bad usage or configuration.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, NoReturn

import click

from ..protocol import AuthenticationFailedError, ConfigurationError, MeshError

DEFAULT_BROKER = "tcp://127.0.0.1:5555"
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
