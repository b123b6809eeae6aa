"""The security commands: `mesh keys`, `mesh token` and `mesh policy` (docs/security.md)."""

from __future__ import annotations

import os

import click

from ..protocol import MeshError
from .base import BROKER_HELP, DEFAULT_BROKER, UsageError, _client, _fail, _print_json, credentials_option, main

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
