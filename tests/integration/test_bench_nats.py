"""`mesh bench --peer nats`: NATS measured beside the raw floor and the mesh, with real nats-server processes."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mesh.bench import nats as bench_nats
from mesh.cli import main


def _servers() -> set[int]:
    """The pids of every running nats-server of the 'bench' extra (found by executable, not by name)."""
    binary = bench_nats.server_binary()
    assert binary is not None, "the 'bench' extra is not installed"
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "exe") == binary:
                    found.add(int(entry.name))
            except OSError:
                pass  # exited meanwhile, or not ours to read
    return found


def _bench(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "mesh", "bench", "--peer", "nats", "--payload", "64", "--duration", "0.5", "--json", *args],
        capture_output=True, text=True, timeout=180, check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_nats_requests_are_all_answered_and_reported_beside_the_mesh_with_no_server_left():
    """NATS request-reply: every request sent gets its own bytes back (requests == answered), the
    windowed count is positive and never exceeds what was sent, the mesh's ratio to NATS is its
    throughput over NATS's, and no nats-server process started by the run outlives it."""
    before = _servers()
    report = _bench("--clients", "2", "--inflight", "4")
    nats = report["nats"]
    assert report["peer"] == "nats"
    assert 0 < nats["commands"] <= nats["requests"]
    assert nats["answered"] == nats["requests"]
    lat = nats["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
    assert report["ratio_nats"] == pytest.approx(report["mesh"]["throughput"] / nats["throughput"])
    assert report["ratio"] == pytest.approx(report["mesh"]["throughput"] / report["raw"]["throughput"])
    assert report["machine"]["nats-server"].startswith("v") and report["machine"]["nats-py"]
    assert _servers() - before == set()


@pytest.mark.slow  # a full benchmark run (~20 s): `make soak`; the suite keeps its 10-minute budget
def test_nats_events_fan_out_is_reported_per_subscriber_count_with_no_server_left():
    """Core NATS publish/subscribe runs in the raw chain's shape: delivered and published are
    positive, missed is counted (not None as for the raw chain), the ratio is the mesh's delivered
    rate over NATS's, and no nats-server outlives the run."""
    before = _servers()
    report = _bench("--events", "--subscribers", "2")
    (run,) = report["runs"]
    nats = run["nats"]
    assert nats["published"] > 0 and nats["delivered"] > 0 and nats["missed"] >= 0
    assert run["ratio_nats"] == pytest.approx(run["mesh"]["delivered_rate"] / nats["delivered_rate"])
    assert _servers() - before == set()


@pytest.mark.slow  # five secured runs (~25 s): `make soak`; the suite keeps its 10-minute budget
def test_security_layers_are_reported_as_ratios_of_nats_with_no_server_left():
    """With --security, NATS is measured once and every layer's ratio to it is that layer's
    throughput over NATS's, beside its ratio to security off; no nats-server outlives the run."""
    before = _servers()
    report = _bench("--security", "--clients", "1", "--inflight", "4")
    nats = report["nats"]
    assert report["peer"] == "nats" and nats["answered"] == nats["requests"] > 0
    assert [r["mode"] for r in report["rows"]] == ["off", "curve", "tokens", "encrypted", "signed"]
    for row in report["rows"]:
        assert row["ratio_nats"] == pytest.approx(row["throughput"] / nats["throughput"])
        assert row["ratio"] == pytest.approx(row["throughput"] / report["rows"][0]["throughput"])
    assert _servers() - before == set()


def test_the_server_stops_when_its_block_fails():
    """A failure inside `nats_server()` still stops the server: its pid is gone afterwards."""
    with pytest.raises(RuntimeError, match="a failed run"), bench_nats.nats_server() as server:
        assert server.pid in _servers()
        raise RuntimeError("a failed run")
    assert server.pid not in _servers()


def test_the_server_dies_with_the_process_that_started_it():
    """A benchmark process killed outright (SIGKILL: no cleanup runs) takes its nats-server with it."""
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    before = _servers()
    owner = ctx.Process(target=bench_nats.server, args=("", "", ready, stop), daemon=True)
    owner.start()
    try:
        ready.get(timeout=30)
        (pid,) = _servers() - before
        exited = os.pidfd_open(pid)  # readable once that process has exited, whoever its parent is then
        try:
            os.kill(owner.pid, signal.SIGKILL)
            owner.join()
            select.select([exited], [], [], 30)  # a server that outlives its owner never gets there
        finally:
            os.close(exited)
        assert pid not in _servers()
    finally:  # not stop.set(): an Event whose waiter was killed mid-wait blocks the setter
        if owner.is_alive():
            owner.kill()
        owner.join()


def test_ctrl_c_during_a_run_leaves_no_server():
    """Ctrl-C (SIGINT to the terminal's process group) in the middle of a NATS run stops it and its nats-server."""
    before = _servers()
    # A shell gives a foreground command Ctrl-C's default action; one started in the
    # background (`make test &`) ignores SIGINT, and so would the bench inherit that
    # and run to its end. A handler in this process becomes the default in the child.
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        bench = subprocess.Popen(
            [sys.executable, "-m", "mesh", "bench", "--peer", "nats", "--clients", "1", "--inflight", "4", "--duration", "3"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,  # its own group, as a shell gives
        )
    finally:
        signal.signal(signal.SIGINT, ignored)
    try:
        started: set[int] = set()
        while not started and bench.poll() is None:  # the raw run comes first, then NATS's server
            started = _servers() - before
            time.sleep(0.05)
        (pid,) = started
        exited = os.pidfd_open(pid)
        try:
            os.killpg(bench.pid, signal.SIGINT)
            bench.wait(timeout=35)  # well inside the test's own limit, so a hang fails this test only
            select.select([exited], [], [], 10)
        finally:
            os.close(exited)
        assert pid not in _servers()
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
            bench.wait()


def test_peer_nats_without_the_extra_names_it(monkeypatch: pytest.MonkeyPatch):
    """Without nats-py, `--peer nats` stops before anything runs, exit 1, naming the extra to install."""
    monkeypatch.setitem(sys.modules, "nats", None)  # import nats now fails as if it were not installed
    result = CliRunner().invoke(main, ["bench", "--peer", "nats"])
    assert result.exit_code == 1
    assert "needs the 'bench' extra: pip install 'zmq-mcp-mesh[bench]'" in result.output


@pytest.mark.parametrize(
    ("args", "code", "complaint"),
    [
        (["--peer", "nats", "--transport", "ipc"], 2, "--peer nats runs over tcp only"),
        (["--peer", "nats", "--monitor"], 2, "--peer does not apply to the monitor benchmark"),
        (["--peer", "zeromq"], 2, "Invalid value for '--peer'"),
    ],
)
def test_peer_refuses_what_it_cannot_run(args, code, complaint):
    """A peer over ipc, beside a benchmark without one, or an unknown peer is a usage error before anything runs."""
    result = CliRunner().invoke(main, ["bench", *args])
    assert result.exit_code == code
    assert complaint in result.output
