"""`mesh top`: the monitor's heartbeat view in a terminal, refreshed in place.

Rules of this module:

* `render(snapshot)` is pure: a `/snapshot` tree (see `snapshot.py`) in, a rich
  renderable out. No clock, no I/O; every age shown comes from the snapshot itself
  (`silence_s` of a node, the snapshot's `time` minus a broker's `last_seen`).
* `fetch_snapshot()` is the only network call. Library errors (urllib, JSON) never
  leave it: they become one `MonitorUnavailableError` with a one-line reason.
* `watch()` is the thin loop: the first fetch must succeed (the CLI turns a failure
  into exit code 2); after that a failed fetch keeps the last snapshot on screen with
  the error above it, and the loop keeps retrying every interval.
* The token only travels in the `Authorization` header; it is never shown or logged.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, Final

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

__all__ = ["DEFAULT_URL", "MonitorUnavailableError", "fetch_snapshot", "render", "watch"]

DEFAULT_URL: Final = "http://127.0.0.1:8222"
FETCH_TIMEOUT_S: Final = 3.0
BAR_WIDTH: Final = 10
STATE_STYLE: Final = {"up": "bold green", "suspect": "bold yellow", "dead": "bold red"}


class MonitorUnavailableError(Exception):
    """The monitor could not be reached, refused the token, or answered something else."""


def fetch_snapshot(url: str, token: str | None = None, timeout: float = FETCH_TIMEOUT_S) -> dict[str, Any]:
    """GET `{url}/snapshot` and decode it.

    Args:
        url: the monitor's base address, e.g. `http://127.0.0.1:8222`.
        token: the bearer token, or None for a monitor that runs open.
        timeout: seconds to wait for the answer.

    Returns:
        The snapshot tree.

    Raises:
        MonitorUnavailableError: unreachable, 401, another non-200 status, or not JSON.
    """
    request = urllib.request.Request(url.rstrip("/") + "/snapshot")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise MonitorUnavailableError(f"monitor {url} refused the token (401): give --token-file") from None
        raise MonitorUnavailableError(f"monitor {url} answered {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise MonitorUnavailableError(f"monitor {url} is unreachable: {reason}") from None
    try:
        snapshot = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MonitorUnavailableError(f"monitor {url} did not answer JSON at /snapshot") from None
    if not isinstance(snapshot, dict):
        raise MonitorUnavailableError(f"monitor {url} answered an unexpected /snapshot")
    return snapshot


# ------------------------------------------------------------------ rendering


def _state(state: str) -> Text:
    return Text(state, style=STATE_STYLE.get(state, "dim"))


def _bar(fraction: float, state: str) -> Text:
    """Liveness left: full just after a heartbeat, empty when the window runs out."""
    fraction = min(1.0, max(0.0, fraction))
    full = round(fraction * BAR_WIDTH)
    return Text("█" * full + "░" * (BAR_WIDTH - full), style=STATE_STYLE.get(state, "dim"))


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else f"{max(0.0, seconds):.1f}s"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}ms"


def _summary(snapshot: dict[str, Any]) -> Text:
    varz = snapshot.get("varz", {})
    rates = varz.get("throughput", {})
    latency = varz.get("latency_ms", {})
    errors = snapshot.get("errors", {})
    text = Text()
    text.append(f"broker {snapshot.get('broker', '?')}", style="bold")
    if varz.get("draining"):
        text.append(" draining", style="bold yellow")
    text.append(f"  up {_age(varz.get('uptime_s'))}")
    text.append(f"  {rates.get('commands_per_s', 0.0):.1f} cmd/s")
    text.append(f"  in {rates.get('messages_in_per_s', 0.0):.1f}/s out {rates.get('messages_out_per_s', 0.0):.1f}/s")
    text.append(f"  p50 {_ms(latency.get('p50'))} p99 {_ms(latency.get('p99'))}")
    text.append(f"  queued {varz.get('queued', 0)}")
    total = errors.get("total", 0)
    text.append(f"\nerrors {total}", style="bold red" if total else "")
    parts = [f"{cat} {n}" for cat, n in errors.get("by_category", {}).items() if n]
    if parts:
        text.append(f" ({', '.join(parts)})", style="red")
    return text


def _brokers(snapshot: dict[str, Any]) -> Table:
    now = snapshot.get("time")
    table = Table(title="Brokers", title_justify="left", expand=True)
    for column in ("name", "role", "state", "heartbeat"):
        table.add_column(column)
    for broker in snapshot.get("cluster", {}).get("brokers", []):
        last = broker.get("last_seen")
        age = None if now is None or last is None else now - last
        state = str(broker.get("state", "?"))
        table.add_row(str(broker.get("name", "?")), str(broker.get("role", "")), _state(state), _age(age))
    return table


def _nodes(snapshot: dict[str, Any]) -> Table:
    table = Table(title="Nodes", title_justify="left", expand=True)
    for column in ("name", "state", "heartbeat", "liveness", "load", "in flight", "completed", "services"):
        table.add_column(column, justify="right" if column in ("load", "in flight", "completed") else "left",
                         min_width=BAR_WIDTH if column == "liveness" else None, no_wrap=column == "liveness")
    nodes = snapshot.get("nodes", {}).get("nodes", [])
    for node in nodes:
        state = str(node.get("state", "?"))
        silence, window = node.get("silence_s"), node.get("liveness_s") or 0
        left = 0.0 if state == "dead" or not window or silence is None else 1 - silence / window
        table.add_row(
            str(node.get("name", "?")),
            _state(state),
            _age(silence),
            _bar(left, state),
            f"{100 * node.get('load', 0.0):.0f}%",
            f"{node.get('in_flight', 0)}/{node.get('capacity', 0)}",
            str(node.get("completed", 0)),
            ",".join(node.get("services", [])),
        )
    if not nodes:
        table.add_row(Text("no nodes", style="dim"), "", "", "", "", "", "", "")
    return table


def _recent_errors(snapshot: dict[str, Any], shown: int = 5) -> Table | None:
    recent = snapshot.get("errors", {}).get("recent", [])[-shown:]
    if not recent:
        return None
    table = Table(title="Recent errors", title_justify="left", expand=True)
    for column in ("code", "name", "category", "count"):
        table.add_column(column)
    for entry in reversed(recent):
        table.add_row(str(entry.get("code")), str(entry.get("name")), str(entry.get("category")), str(entry.get("count")))
    return table


def render(snapshot: dict[str, Any], error: str | None = None) -> RenderableType:
    """The whole view of one snapshot.

    Args:
        snapshot: a `/snapshot` tree.
        error: shown above the view when the latest fetch failed (the snapshot is the last good one).

    Returns:
        A rich renderable (a `Group` of a summary line and tables).
    """
    parts: list[RenderableType] = []
    if error is not None:
        parts.append(Text(f"{error} (showing the last snapshot, retrying)", style="bold red"))
    parts += [_summary(snapshot), _brokers(snapshot), _nodes(snapshot)]
    errors = _recent_errors(snapshot)
    if errors is not None:
        parts.append(errors)
    return Group(*parts)


# ----------------------------------------------------------------------- loop


def watch(
    url: str,
    token: str | None,
    interval: float,
    *,
    console: Console | None = None,
    fetch: Callable[[str, str | None], dict[str, Any]] = fetch_snapshot,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Refresh the view every `interval` seconds until Ctrl-C.

    Raises:
        MonitorUnavailableError: the first fetch failed (later failures are shown, not raised).
    """
    snapshot = fetch(url, token)
    with Live(render(snapshot), console=console, auto_refresh=False, screen=False) as live:
        try:
            while True:
                sleep(interval)
                error = None
                try:
                    snapshot = fetch(url, token)
                except MonitorUnavailableError as exc:
                    error = str(exc)
                live.update(render(snapshot, error), refresh=True)
        except KeyboardInterrupt:
            return
