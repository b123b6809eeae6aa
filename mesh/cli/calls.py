"""The client commands: `mesh call`, `mesh services` and `mesh events publish|subscribe`."""

from __future__ import annotations

import json

import click

from ..protocol import MeshError
from .base import (
    BROKER_HELP,
    DEFAULT_BROKER,
    UsageError,
    _client,
    _fail,
    _json_default,
    _json_payload,
    _print_json,
    credentials_option,
    main,
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
