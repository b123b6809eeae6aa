"""`mesh top`: the pure rendering of a snapshot, the first-fetch failure, and JSON log lines."""

from __future__ import annotations

import io
import json
import logging

import pytest
from click.testing import CliRunner
from rich.console import Console

from mesh.cli import JsonLogFormatter, main
from mesh.monitor.top import MonitorUnavailableError, fetch_snapshot, render, watch


def snapshot() -> dict:
    def node(name: str, state: str, silence: float, in_flight: int = 0) -> dict:
        return {"id": name.encode().hex(), "name": name, "state": state, "capacity": 4, "in_flight": in_flight,
                "load": in_flight / 4, "completed": 7, "services": ["echo"], "registered_at": 0.0,
                "last_seen": 100.0 - silence, "silence_s": silence, "liveness_s": 3.0}

    return {
        "broker": "main",
        "time": 100.0,
        "varz": {"uptime_s": 100.0, "draining": False, "queued": 2,
                 "throughput": {"commands_per_s": 42.0, "messages_in_per_s": 90.0, "messages_out_per_s": 88.0},
                 "latency_ms": {"p50": 1.25, "p95": 3.0, "p99": 7.5, "samples": 10}},
        "nodes": {"broker": "main", "nodes": [node("echo-1", "up", 0.2, 3), node("kv-1", "suspect", 2.0),
                                               node("fs-1", "dead", 9.0)]},
        "cluster": {"mode": "standalone", "role": "standalone",
                    "brokers": [{"name": "main", "role": "standalone", "state": "up", "last_seen": 99.5}], "peers": []},
        "errors": {"total": 3, "by_category": {"protocol": 1, "security": 2, "system": 0},
                   "recent": [{"code": 401, "name": "UNAUTHENTICATED", "category": "security", "count": 2, "time": 99.0}]},
    }


def text_of(renderable) -> str:
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_render_shows_brokers_nodes_states_and_numbers():
    """Every broker and node appears with its state, heartbeat age, load, throughput, p50/p99 and errors."""
    text = text_of(render(snapshot()))
    for expected in ("main", "standalone", "echo-1", "kv-1", "fs-1", "up", "suspect", "dead",
                     "0.2s", "2.0s", "0.5s", "75%", "3/4", "42.0 cmd/s", "p50 1.2ms", "p99 7.5ms",
                     "errors 3", "security 2", "UNAUTHENTICATED"):
        assert expected in text, expected


def test_render_colours_states_and_shows_a_fetch_error():
    """States are coloured (green/yellow/red) and a failed refresh is shown above the last snapshot."""
    console = Console(record=True, width=120, force_terminal=True, color_system="truecolor", file=io.StringIO())
    console.print(render(snapshot(), error="monitor x is unreachable: refused"))
    ansi = console.export_text(styles=True)
    assert "monitor x is unreachable: refused" in ansi
    assert "\x1b[" in ansi


def test_render_survives_an_empty_snapshot():
    """A broker with no nodes yet renders without error."""
    assert "no nodes" in text_of(render({"broker": "b", "time": 1.0}))


def test_unreachable_monitor_is_one_line_and_exit_code_2():
    """Nothing listening: a one-line error and exit code 2."""
    result = CliRunner().invoke(main, ["top", "--monitor", "http://127.0.0.1:9", "--interval", "0.1"])
    assert result.exit_code == 2
    assert "unreachable" in result.output and len(result.output.strip().splitlines()) == 1


def test_watch_keeps_retrying_after_a_later_failure():
    """After the first good fetch, a failure is shown in the view and the loop goes on."""
    answers = iter([snapshot(), MonitorUnavailableError("down"), snapshot(), KeyboardInterrupt()])

    def fetch(url, token):
        item = next(answers)
        if isinstance(item, BaseException):
            raise item
        return item

    watch("http://x", None, 0.0, console=Console(record=True, width=120, file=io.StringIO()), fetch=fetch, sleep=lambda _s: None)
    with pytest.raises(StopIteration):
        next(answers)


def test_fetch_maps_a_refused_token_to_one_error(monkeypatch):
    """A 401 from the monitor becomes a MonitorUnavailableError naming the token."""
    import urllib.error
    import urllib.request

    def refuse(request, timeout):
        assert request.get_header("Authorization") == "Bearer secret"
        raise urllib.error.HTTPError(request.full_url, 401, "Unauthorized", {}, None)

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    with pytest.raises(MonitorUnavailableError, match="401"):
        fetch_snapshot("http://127.0.0.1:8222", "secret")


def test_json_log_formatter_emits_one_json_object_with_the_keys():
    """--log-format json: each record is valid JSON with ts, level, logger and message."""
    record = logging.LogRecord("mesh.broker", logging.WARNING, __file__, 1, "node %s lost", ("echo-1",), None)
    line = JsonLogFormatter().format(record)
    entry = json.loads(line)
    assert "\n" not in line
    assert {"ts", "level", "logger", "message"} <= set(entry)
    assert (entry["level"], entry["logger"], entry["message"]) == ("WARNING", "mesh.broker", "node echo-1 lost")
    assert entry["ts"].endswith("+00:00")
