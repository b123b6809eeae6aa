"""`mesh bench --events`: the real executable measures a raw PUB/SUB chain and the mesh per subscriber count."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from mesh.cli import main


def test_events_bench_reports_raw_and_mesh_delivery_and_their_ratio():
    """A short run reports, per subscriber count, positive delivered rates for both chains and their ratio."""
    done = subprocess.run(
        [sys.executable, "-m", "mesh", "bench", "--events", "--subscribers", "1,3", "--payload", "64",
         "--duration", "0.5", "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["settings"]["subscribers"] == [1, 3]
    assert [run["subscribers"] for run in report["runs"]] == [1, 3]
    for run in report["runs"]:
        raw, mesh = run["raw"], run["mesh"]
        for figures in (raw, mesh):
            assert figures["published"] > 0 and figures["delivered"] > 0
            assert figures["delivered_rate"] == pytest.approx(figures["delivered"] / 0.5)
            assert figures["publish_rate"] == pytest.approx(figures["published"] / 0.5)
        assert run["ratio"] == pytest.approx(mesh["delivered_rate"] / raw["delivered_rate"])
        assert mesh["missed"] >= 0 and raw["missed"] is None  # a raw subscriber cannot count its losses


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--subscribers", "5"], "--subscribers does not apply to the command benchmark"),
        (["--events", "--clients", "2"], "--clients does not apply to the events benchmark"),
        (["--events", "--subscribers", "1,x"], "--subscribers must be a comma list"),
        (["--events", "--subscribers", "0"], "--subscribers must be a comma list"),
    ],
)
def test_events_bench_refuses_options_it_would_ignore_or_cannot_read(args, complaint):
    """Options of the other benchmark and malformed subscriber counts are usage errors, before anything runs."""
    result = CliRunner().invoke(main, ["bench", *args])
    assert result.exit_code == 2
    assert complaint in result.output
