"""`mesh bench --failover`: the real executable kills and stops real nodes under load and times what follows."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from mesh.cli import main


@pytest.mark.timeout(180)
def test_failover_bench_times_detection_recovery_and_rejoin_of_each_signal():
    """One round per signal, reached through `mesh bench`: the options become the settings, the
    broker declares every victim down, a stopped node rejoins after SIGCONT and a killed one is
    replaced instead; the table shows a row per signal."""
    done = subprocess.run(
        [sys.executable, "-m", "mesh", "bench", "--failover", "--nodes", "2", "--rounds", "1",
         "--signals", "kill,stop", "--heartbeat", "0.5", "--callers", "2", "--seed", "1", "--json"],
        capture_output=True, text=True, timeout=170, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    s = report["settings"]
    assert (s["nodes"], s["rounds"], s["signals"], s["heartbeat_interval"], s["callers"], s["seed"]) == (
        2, 1, ["kill", "stop"], 0.5, 2, 1
    )
    assert report["liveness_s"] == pytest.approx(1.5)
    assert set(report["summary"]) == {"kill", "stop"}
    for sig, m in report["summary"].items():
        assert (m["rounds"], m["detected"]) == (1, 1), sig
    rounds = {r["signal"]: r for r in report["rounds"]}
    assert set(rounds) == {"kill", "stop"}
    for sig, r in rounds.items():
        assert r["detection"] is not None and r["reason"] in ("silent", "unreachable"), sig
    assert rounds["stop"]["rejoin"] is not None, "a continued node registers again"
    assert rounds["kill"]["rejoin"] is None, "a killed node is replaced, not rejoined"


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--failover", "--clients", "2"], "--clients does not apply to the failover benchmark"),
        (["--failover", "--duration", "2"], "--duration does not apply to the failover benchmark"),
        (["--rounds", "2"], "--rounds does not apply to the command benchmark"),
        (["--events", "--plain-share", "0.5"], "--plain-share does not apply to the events benchmark"),
        (["--failover", "--signals", "kill,hup"], "--signals must be a comma list of kill and stop, got 'kill,hup'"),
        (["--failover", "--signals", ","], "--signals must be a comma list of kill and stop, got ','"),
        (["--failover", "--mcp"], "--failover, --mcp, --cluster, --events, --security, --monitor and --scale are different benchmarks"),
    ],
)
def test_failover_bench_refuses_options_it_would_ignore_or_cannot_read(args, complaint):
    """Options another benchmark reads, unknown signals and a second benchmark are usage errors before anything runs."""
    result = CliRunner().invoke(main, ["bench", *args])
    assert result.exit_code == 2, result.output
    assert complaint in result.output


@pytest.mark.parametrize("args", [["--nodes", "1"], ["--heartbeat", "0.01"], ["--plain-share", "1.5"], ["--rounds", "0"]])
def test_failover_bench_refuses_settings_out_of_range(args):
    """Fewer than 2 nodes, a heartbeat outside 0.05-60 s, a share outside 0-1 or no rounds is refused by the option itself."""
    result = CliRunner().invoke(main, ["bench", "--failover", *args])
    assert result.exit_code == 2
    assert f"Invalid value for '{args[0]}'" in result.output
