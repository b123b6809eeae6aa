"""From the built wheel to a running mesh, outside the repository, as a PyPI user gets it.

A wheel is built from this tree, installed with no extras into a fresh virtual
environment in a temporary directory (its dependencies from the package index), and
then exactly the README's PyPI path runs: `mesh init demo`, `cd demo`, `mesh up`, and
`mesh call echo.echo` with security on.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
from conftest import clean_env

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART_PORTS = (5555, 5556, 5557, 8222)  # mesh/quickstart/mesh.toml

pytestmark = pytest.mark.timeout(300)


def _busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _run(*args: str | Path, cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_the_wheel_installs_without_extras_and_mesh_init_then_up_serves_calls(
    tmp_path: Path, wheel_venv: tuple[Path, Path]
) -> None:
    """Invariants: the wheel ships py.typed and the quickstart; a broker-only install (no
    extras) runs `mesh up` from `mesh init` with security on and answers `mesh call`;
    `mesh mcp` and `mesh top` without their extras name the install command and fail."""
    if any(_busy(p) for p in QUICKSTART_PORTS):
        pytest.skip(f"a quickstart already listens on one of {QUICKSTART_PORTS} here")
    wheel, venv = wheel_venv
    names = zipfile.ZipFile(wheel).namelist()
    assert "mesh/py.typed" in names and "mesh/quickstart/mesh.toml" in names
    tops = {n.split("/")[0] for n in names if "/" in n and ".dist-info/" not in n}
    assert "mesh/nodes/echo.py" in names
    assert tops == {"mesh"}, f"top-level packages {tops} (a stale build/ directory? `make clean`)"

    mesh = venv / "bin" / "mesh"

    for command, extra in (("mcp", "mcp"), ("top", "top")):
        refused = _run(mesh, command)
        assert refused.returncode != 0
        assert f"pip install 'zmq-mcp-mesh[{extra}]'" in refused.stderr

    work = tmp_path / "work"
    work.mkdir()
    assert _run(mesh, "init", "demo", cwd=work).returncode == 0
    demo = work / "demo"
    up = subprocess.Popen([str(mesh), "up"], cwd=demo, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            call = _run(mesh, "call", "echo.echo", '{"text": "from the wheel"}', cwd=demo, timeout=30)
            if call.returncode == 0 or time.monotonic() > deadline or up.poll() is not None:
                break
            time.sleep(0.5)
        assert call.returncode == 0, call.stderr[-2000:]
        assert '"from the wheel"' in call.stdout
        assert (demo / "var" / "mesh" / "credentials" / "dev.toml").exists()  # security on: the call used it
    finally:
        os.killpg(up.pid, signal.SIGTERM)
        try:
            up.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
