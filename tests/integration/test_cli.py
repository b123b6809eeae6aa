"""The `mesh` command: CliRunner for parsing and errors, the real executable against a real broker."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mesh.cli import main
from mesh.launcher import BROKER_READY
from mesh.testing import run_node, spawn

MESH = str(Path(sys.executable).parent / "mesh")


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MESH, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "command",
    [[], ["up"], ["broker"], ["node"], ["call"], ["services"], ["topology", "check"], ["bench"],
     ["events"], ["events", "publish"], ["events", "subscribe"], ["keys", "curve"], ["keys", "rotate"],
     ["token", "issue"], ["token", "revoke"], ["top"], ["mcp"]],
)
def test_every_command_has_help(command):
    """`--help` works on every command and describes it."""
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


@pytest.mark.parametrize(
    ("args", "problem"),
    [(["--token-file", __file__], "--token-file, --tls-cert and --tls-key go with --http"), (["--http", "nowhere"], "HOST:PORT")],
)
def test_mcp_refuses_bad_options_before_starting(args, problem):
    """`mesh mcp` names a token file without --http, or a bad address, as a usage error."""
    result = CliRunner().invoke(main, ["mcp", *args])
    assert result.exit_code == 2 and problem in result.output


def test_topology_check_accepts_the_quickstart():
    """The shipped quickstart topology passes the check."""
    result = CliRunner().invoke(main, ["topology", "check", "topologies/quickstart.toml"])
    assert result.exit_code == 0, result.output
    assert "ok (1 broker(s)" in result.output


def test_topology_check_lists_every_problem_with_its_key(tmp_path: Path):
    """Every problem in a bad topology is reported with the dotted key it is at."""
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[mesh]\nname = 1\n[brokers.main]\nclients = "tcp//nope"\nnodes = "tcp://127.0.0.1:7001"\nspeed = 3\n'
        '[nodes.kv]\nbroker = "other"\nreplicas = 0\n'
    )
    result = CliRunner().invoke(main, ["topology", "check", str(bad)])
    assert result.exit_code == 2
    for key in ["mesh.name", "brokers.main.clients", "brokers.main.speed", "nodes.kv.use", "nodes.kv.broker", "nodes.kv.replicas"]:
        assert f"  {key}: " in result.output, key
    assert "6 problem(s)" in result.output


def test_topology_check_reports_toml_syntax_and_missing_files(tmp_path: Path):
    """A file that is not TOML, or not there, is a clear error, not a traceback."""
    broken = tmp_path / "broken.toml"
    broken.write_text("[mesh\n")
    result = CliRunner().invoke(main, ["topology", "check", str(broken)])
    assert result.exit_code == 2 and "syntax:" in result.output
    result = CliRunner().invoke(main, ["topology", "check", str(tmp_path / "missing.toml")])
    assert result.exit_code == 2 and "file:" in result.output


@pytest.mark.parametrize(
    "args, message",
    [(["call", "noaction", "{}"], "SERVICE.ACTION"), (["call", "a.b", "{nope"], "not JSON"), (["node", "echo", "--config", "[1]"], "JSON object")],
)
def test_bad_arguments_are_usage_errors(args, message):
    """Malformed targets and JSON are refused with exit status 2 and a clear message."""
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert message in result.output


def test_call_and_services_with_the_real_executable(tcp_broker):
    """`mesh call` prints the JSON result; failures print the error code and exit 1; `mesh services` lists actions."""
    with run_node("testnodes:node", tcp_broker):
        ok = run("call", "alpha.typed", '{"count": 4}', "--broker", tcp_broker.clients)
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout) == 8
        bad = run("call", "alpha.typed", '{"count": "x"}', "--broker", tcp_broker.clients)
        assert bad.returncode == 1
        assert "1002 ValidationFailedError" in bad.stderr and "count" in bad.stderr
        missing = run("call", "nobody.here", "{}", "--broker", tcp_broker.clients)
        assert missing.returncode == 1 and "1003" in missing.stderr
        listed = run("services", "--broker", tcp_broker.clients)
        assert listed.returncode == 0
        assert json.loads(listed.stdout)["alpha"]["actions"]["typed"]["schema"]["required"] == ["count"]


def test_call_without_a_broker_times_out_cleanly():
    """With nothing listening, `mesh call` gives up after its timeout with a deadline error."""
    result = run("call", "echo.echo", "{}", "--broker", "tcp://127.0.0.1:9", "--timeout", "0.5")
    assert result.returncode == 1
    assert "3004 DeadlineExceededError" in result.stderr


def test_bench_reports_both_runs_and_their_ratio():
    """A short `mesh bench --json` measures the raw loop and the mesh and reports the ratio; each
    run's latency histogram counts every command answered in the window exactly once."""
    done = run("bench", "--clients", "1", "--inflight", "4", "--payload", "64", "--duration", "0.5", "--json", timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    for kind in ("raw", "mesh"):
        assert report[kind]["commands"] > 0
        lat = report[kind]["latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
        hist = report[kind]["histogram"]
        assert len(hist["counts"]) == len(hist["bounds_ms"]) + 1
        assert sum(hist["counts"]) == report[kind]["commands"]  # fewer than SAMPLE_LIMIT: all sampled
    assert report["ratio"] == pytest.approx(report["mesh"]["throughput"] / report["raw"]["throughput"])
    assert report["settings"] == {"clients": 1, "inflight": 4, "payload": 64, "duration": 0.5, "transport": "tcp"}


def test_topology_check_finds_bad_ports_unknown_nodes_and_config_that_does_not_fit(tmp_path: Path):
    """Ports out of range, unknown node names, misspelt config keys and TOML dates are all reported."""
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[brokers.main]\nclients = "tcp://127.0.0.1:99999"\nnodes = "tcp://127.0.0.1:5556"\n'
        '[nodes.a]\nuse = "nosuchnode"\n'
        '[nodes.b]\nuse = "sqlite"\nconfig = { databse = "x", when = 1979-05-27 }\n'
    )
    result = CliRunner().invoke(main, ["topology", "check", str(bad)])
    assert result.exit_code == 2
    assert "brokers.main.clients: 'tcp://127.0.0.1:99999'" in result.output
    assert "nodes.a.use: unknown node 'nosuchnode'" in result.output
    assert "nodes.b.use: config does not fit sqlite" in result.output and "databse" in result.output
    assert "nodes.b.config.when: a date cannot be passed" in result.output


def test_topology_retention_rules_are_checked(tmp_path: Path):
    """Bad retention rules are reported with their index and key."""
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[brokers.main]\nclients = "tcp://127.0.0.1:7001"\nnodes = "tcp://127.0.0.1:7002"\nevents = "nope"\n'
        'event_hwm = 0\n[[brokers.main.retention]]\nprefix = "a..b"\n[[brokers.main.retention]]\nmax_events = -1\nkeep = 1\n'
    )
    result = CliRunner().invoke(main, ["topology", "check", str(bad)])
    assert result.exit_code == 2
    for key in ["brokers.main.events", "brokers.main.event_hwm", "brokers.main.retention[0].prefix",
                "brokers.main.retention[1].max_events", "brokers.main.retention[1].keep"]:
        assert f"  {key}: " in result.output, (key, result.output)


def test_events_cli_refuses_bad_input_clearly():
    """A payload that is not JSON, or a bad --retention, is a usage error, not a traceback."""
    result = CliRunner().invoke(main, ["events", "publish", "a.b", "{nope"])
    assert result.exit_code == 2 and "not JSON" in result.output
    result = CliRunner().invoke(main, ["broker", "--retention", "a:b:c"])
    assert result.exit_code == 2 and "PREFIX:MAX_EVENTS:MAX_BYTES" in result.output


def test_a_broker_runs_from_its_topology_table(tmp_path: Path):
    """`mesh broker --topology FILE --name NAME` serves that table's endpoints and limits: a
    message over its `max_message_bytes` is refused with the code MESSAGE_TOO_LARGE (1005)."""
    topology = tmp_path / "mesh.toml"
    topology.write_text(
        f'[brokers.edge]\nclients = "ipc://{tmp_path}/c"\nnodes = "ipc://{tmp_path}/n"\nmax_message_bytes = 2048\n'
        '[brokers.other]\nclients = "tcp://127.0.0.1:5555"\nnodes = "tcp://127.0.0.1:5556"\n'
    )
    with spawn(["broker", "--topology", str(topology), "--name", "edge", "--log-level", "warning"]) as proc:
        m = proc.wait_for(BROKER_READY.pattern)
        assert (m.group("name"), m.group("clients")) == ("edge", f"ipc://{tmp_path}/c")
        result = run("call", "echo.echo", json.dumps({"text": "x" * 3000}), "--broker", m.group("clients"), "--timeout", "5")
        assert result.returncode == 1 and "1005 MessageTooLargeError" in result.stderr, result.stderr


def test_events_publish_and_subscribe_with_the_real_executable(tcp_broker):
    """`mesh events publish` prints the seq; `mesh events subscribe --from 0 --count` prints the events."""
    for i in range(3):
        result = run("events", "publish", "demo.t", json.dumps({"i": i}), "--broker", tcp_broker.clients)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"topic": "demo.t", "seq": i + 1}
    result = run("events", "subscribe", "demo", "--from", "1", "--count", "2", "--broker", tcp_broker.clients)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(line["seq"], line["payload"]) for line in lines] == [(2, {"i": 1}), (3, {"i": 2})]
    refused = run("events", "publish", "mesh.node.up", "{}", "--broker", tcp_broker.clients)
    assert refused.returncode == 1 and "2002" in refused.stderr


def test_keys_and_tokens_commands(tmp_path: Path):
    """`mesh keys curve`, `mesh keys rotate` and `mesh token issue` work on a real state directory."""
    import time

    import zmq.auth

    from mesh.security.payload import KeyRing
    from mesh.security.state import ensure_state, token_settings
    from mesh.security.token_keys import load_secret
    from mesh.security.tokens import TokenVerifier

    layout = ensure_state(tmp_path / "state", nodes={"echo": ["echo"]}, now=time.time())
    result = CliRunner().invoke(main, ["keys", "curve", "alice", "--dir", str(tmp_path / "k")])
    assert result.exit_code == 0, result.output
    public, secret = zmq.auth.load_certificate(str(tmp_path / "k" / "alice.key_secret"))
    assert public and secret
    before = KeyRing.load(layout.keyring).active_kid
    result = CliRunner().invoke(main, ["keys", "rotate", "--state", str(layout.root), "--delay", "0"])
    assert result.exit_code == 0, result.output
    assert KeyRing.load(layout.keyring).active_kid == json.loads(result.output)["new_key"] != before
    result = CliRunner().invoke(main, ["token", "issue", "--state", str(layout.root), "--sub", "alice", "--role", "reader", "--ttl", "15m"])
    assert result.exit_code == 0, result.output
    identity = TokenVerifier(token_settings(), load_secret(layout.token_secret)).verify(result.output.strip(), time.time())
    assert identity.subject == "alice" and identity.roles == {"reader"} and 890 < identity.expires - time.time() <= 901
    result = CliRunner().invoke(main, ["token", "issue", "--state", str(layout.root), "--sub", "a", "--role", "r", "--ttl", "soon"])
    assert result.exit_code == 2 and "duration" in result.output
