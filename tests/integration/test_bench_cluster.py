"""`mesh bench --cluster`: the real executable measures exactly-once commands in a 3-broker cluster beside plain ones."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest

from mesh.bench.cluster import format_cluster_report

DURATION = 2.0
RUNS = ["plain", "once_leader", "once_follower"]


def test_cluster_bench_reports_plain_and_exactly_once_runs_with_the_log_entries_they_committed():
    """A short run reports commands/s and latency for plain, exactly-once via the leader and via a
    follower, ratios to plain, and a commit index that rose by two entries per exactly-once command;
    the table shows the same figures."""
    done = subprocess.run(
        [sys.executable, "-m", "mesh", "bench", "--cluster", "--clients", "1", "--inflight", "8",
         "--payload", "64", "--duration", str(DURATION), "--json"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    cluster = report["cluster"]
    assert cluster["leader"] != cluster["follower"]
    assert {cluster["leader"], cluster["follower"]} <= set(cluster["brokers"])
    rows = report["rows"]
    assert [r["run"] for r in rows] == RUNS
    assert [r["broker"] for r in rows] == [cluster["leader"], cluster["leader"], cluster["follower"]]
    plain = rows[0]["throughput"]
    for r in rows:
        assert r["commands"] > 0, r["run"]
        assert r["throughput"] == pytest.approx(r["commands"] / DURATION)
        assert r["ratio"] == pytest.approx(r["throughput"] / plain)
        lat = r["latency_ms"]
        assert all(math.isfinite(lat[k]) and lat[k] > 0 for k in ("p50", "p99"))
        assert lat["p50"] <= lat["p99"]
    assert rows[0]["log"]["entries"] == 0, "plain commands must not touch the replicated log"
    for r in rows[1:]:
        log = r["log"]
        assert log["entries"] >= 2 * r["commands"], r["run"]  # a claim and an outcome per command
        assert log["entries_per_s"] > 0
        assert log["per_command"] == pytest.approx(log["entries_per_s"] / r["throughput"])

    table = format_cluster_report(report)
    for label, r in zip(("plain via leader", "exactly_once via leader", "exactly_once via follower"), rows, strict=True):
        m = re.search(rf"^\s*{label}\s+([\d,]+)\s+[\d.]+\s+[\d.]+\s+([\d.]+)\s", table, re.MULTILINE)
        assert m, table
        assert int(m.group(1).replace(",", "")) == round(r["throughput"])
        assert float(m.group(2)) == pytest.approx(round(r["throughput"]) / round(plain), abs=0.002 + 2 / round(plain))


@pytest.mark.parametrize("other", ["--events", "--security", "--monitor"])
def test_cluster_bench_refuses_another_benchmark_beside_it(other):
    """--cluster with any other benchmark is a usage error naming all four."""
    done = subprocess.run(
        [sys.executable, "-m", "mesh", "bench", "--cluster", other],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert done.returncode == 2
    assert "--cluster, --events, --security, --monitor and --scale are different benchmarks: choose one" in done.stderr
