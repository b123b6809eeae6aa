"""`mesh bench --monitor`: the real executable measures the monitor's cost against the monitor off."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow  # a full benchmark run (~20 s): `make soak`; the suite keeps its 10-minute budget
def test_monitor_bench_alternates_off_and_on_runs_and_reports_their_ratio():
    """Three rounds of off/on runs, the watcher's requests all answered, ratios computed from the runs."""
    done = subprocess.run(
        [sys.executable, "-m", "mesh", "bench", "--monitor", "--clients", "1", "--inflight", "4",
         "--payload", "64", "--duration", "0.5", "--json"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    rounds = report["rounds"]
    assert len(rounds) == 3
    for r in rounds:
        assert r["off"]["commands"] > 0 and r["on"]["commands"] > 0
        assert r["ratio"] == pytest.approx(r["on"]["throughput"] / r["off"]["throughput"])
    assert report["ratio"] == pytest.approx(
        sum(r["on"]["throughput"] for r in rounds) / sum(r["off"]["throughput"] for r in rounds)
    )
    watcher = report["watcher"]
    assert watcher["paths"] == ["/snapshot", "/metrics"]
    assert watcher["requests"] >= 3 * 2, "the watcher did not poll in every monitored run"
    assert watcher["failures"] == 0


def test_monitor_bench_refuses_another_benchmark_beside_it():
    """--monitor with --security is a usage error naming the three benchmarks."""
    done = subprocess.run(
        [sys.executable, "-m", "mesh", "bench", "--monitor", "--security"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert done.returncode == 2
    assert "--events, --security, --monitor and --scale are different benchmarks" in done.stderr
