"""`mesh bench --mcp`: the real executable measures the bridge, the SDK floor and the direct client."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mesh.bench.mcp import SEQ_FACTOR, TARGETS, THROUGHPUT_FACTOR, format_mcp_report


def test_mcp_bench_measures_every_target_and_judges_the_bridge_from_those_figures():
    """Every target answered every sequential call and some in flight; the verdict is computed from them."""
    done = subprocess.run(
        [sys.executable, "-m", "mesh", "bench", "--mcp", "--duration", "0.5", "--payload", "16", "--json"],
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    s, targets = report["settings"], report["targets"]
    assert set(targets) == set(TARGETS)
    for name, t in targets.items():
        assert t["calls"] == s["rounds"] * s["calls"], name
        assert 0 < t["p50_ms"] <= t["p99_ms"], name
        assert t["sequential_per_s"] > 0 and t["inflight_per_s"] > 0, name
    for transport, v in report["verdict"].items():
        bridge, floor, direct = targets[f"bridge_{transport}"], targets[f"floor_{transport}"], targets["direct"]
        for q in ("p50_ms", "p99_ms"):
            assert v[q]["bar"] == pytest.approx(floor[q] + SEQ_FACTOR * direct[q])
            assert v[q]["ratio"] == pytest.approx(bridge[q] / v[q]["bar"])
        assert v["inflight_per_s"]["bar"] == pytest.approx(THROUGHPUT_FACTOR * floor["inflight_per_s"])
    table = format_mcp_report(report)
    for label in ("direct mesh client", "bridge, stdio", "bridge, HTTP", "SDK floor, stdio", "SDK floor, HTTP"):
        assert label in table
    assert "  stdio p50 " in table and "  http  p50 " in table


def test_mcp_bench_refuses_options_it_does_not_use():
    """--mcp with --clients, or beside another benchmark, is a usage error, not an ignored option."""
    for extra, message in ((["--clients", "2"], "--clients does not apply to the mcp benchmark"),
                           (["--monitor"], "--mcp, --cluster, --events, --security, --monitor and --scale are different")):
        done = subprocess.run([sys.executable, "-m", "mesh", "bench", "--mcp", *extra],
                              capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 2
        assert message in done.stderr


def test_the_echo_tool_is_found_under_its_mesh_name_its_portable_name_its_title_or_its_meta():
    """The bench finds echo.echo however the bridge names it, and refuses a list without it."""
    import mcp_types as types

    from mesh.bench.mcp import echo_tool

    def tool(name: str, **extra: object) -> types.Tool:
        return types.Tool(name=name, input_schema={"type": "object"}, **extra)

    assert echo_tool([tool("kv.get"), tool("echo.echo")]) == "echo.echo"
    assert echo_tool([tool("echo_reverse"), tool("echo_echo")]) == "echo_echo"
    assert echo_tool([tool("echo_echo_3f2a", title="echo.echo")]) == "echo_echo_3f2a"
    assert echo_tool([tool("t1", meta={"mesh/name": "echo.echo"})]) == "t1"
    with pytest.raises(LookupError):
        echo_tool([tool("echo_reverse", title="echo.reverse", meta={"mesh/name": "echo.reverse"})])
