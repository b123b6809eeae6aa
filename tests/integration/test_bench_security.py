"""`mesh bench --security`: the real executable measures each security layer against security off."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from click.testing import CliRunner

from mesh.cli import main

ROWS = ["off", "curve", "tokens", "encrypted", "signed"]


@pytest.mark.slow  # a full benchmark run (~20 s): `make soak`; the suite keeps its 10-minute budget
def test_security_bench_reports_every_layer_as_a_ratio_of_security_off():
    """A short run reports, for off, CURVE, tokens, encryption and signatures, commands delivered and the ratio to off."""
    done = subprocess.run(
        [sys.executable, "-m", "mesh", "bench", "--security", "--clients", "1", "--inflight", "4",
         "--payload", "64", "--duration", "0.5", "--json"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["settings"]["clients"] == 1 and report["settings"]["inflight"] == 4
    rows = report["rows"]
    assert [r["mode"] for r in rows] == ROWS
    assert [r["level"] for r in rows] == [None, 0, 1, 2, 3]
    off = rows[0]["throughput"]
    for r in rows:
        assert r["commands"] > 0, r["mode"]
        assert r["throughput"] == pytest.approx(r["commands"] / 0.5)
        assert r["ratio"] == pytest.approx(r["throughput"] / off)
        lat = r["latency_ms"]
        assert all(math.isfinite(lat[k]) and lat[k] > 0 for k in ("p50", "p95", "p99", "mean"))
        assert lat["p50"] <= lat["p99"]
    assert rows[0]["ratio"] == 1.0


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--security", "--events"], "--events, --security, --monitor and --scale are different benchmarks"),
        (["--security", "--subscribers", "5"], "--subscribers does not apply to the security benchmark"),
    ],
)
def test_security_bench_refuses_options_it_would_ignore(args, complaint):
    """--security with --events, or with an option only the events benchmark reads, is a usage error."""
    result = CliRunner().invoke(main, ["bench", *args])
    assert result.exit_code == 2
    assert complaint in result.output
