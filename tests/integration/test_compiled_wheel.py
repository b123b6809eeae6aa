"""The wheel `pip install .` builds runs the hot path compiled, and the compiled modules
pass the tests of the modules they replace.

The build is the session's one (`wheel_venv` in conftest.py), shared with the install
test. The pure-Python path is what the rest of the suite runs
(tests/unit/test_pure_python_path.py holds it to that).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import clean_env

from mesh.compiled import HOT_PATH

ROOT = Path(__file__).resolve().parents[2]
# Tests of the compiled modules that need nothing beyond pytest (no hypothesis, no sockets).
SMOKE = ("test_broker_routing.py", "test_header_validation.py", "test_client_core.py",
         "test_command_states.py", "test_broker_deadlines.py")

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(shutil.which(sysconfig.get_config_var("CC").split()[0]) is None,
                       reason="no C compiler: pip builds the pure-Python wheel here"),
]


def test_the_wheel_ships_every_hot_path_module_compiled_beside_its_source(wheel_venv: tuple[Path, Path]) -> None:
    """Invariants: with a C compiler, the wheel holds an extension module for each module of
    `HOT_PATH` and keeps its `.py` source, and an installed wheel imports the extension
    (`compiled_modules()` lists them all; the codec's `__file__` is a `.so`)."""
    wheel, venv = wheel_venv
    names = zipfile.ZipFile(wheel).namelist()
    for module in HOT_PATH:
        path = module.replace(".", "/")
        assert path + ".py" in names
        assert any(n.startswith(path + ".") and n.endswith(".so") for n in names), f"{module} is not compiled"
    probe = ("import json, mesh.compiled, mesh.protocol.codec as c; "
             "print(json.dumps([mesh.compiled.compiled_modules(), c.__file__]))")
    shown = subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=venv, env=clean_env(),
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr[-2000:]
    compiled, codec_file = json.loads(shown.stdout)
    assert compiled == list(HOT_PATH)
    assert codec_file.startswith(str(venv)) and codec_file.endswith(".so")


def test_the_compiled_modules_pass_the_unit_tests_of_the_hot_path(
    wheel_venv: tuple[Path, Path], tmp_path: Path
) -> None:
    """Invariant: the compiled routing core, codec and client core behave as their source:
    unit tests of those modules pass against the installed wheel, which they import
    (a check in the same run fails unless every `HOT_PATH` module is compiled)."""
    _, venv = wheel_venv
    python = str(venv / "bin" / "python")
    env = clean_env()
    if subprocess.run([python, "-c", "import pytest"], env=env, capture_output=True).returncode != 0:
        got = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "pytest"], env=env,
                             capture_output=True, text=True, timeout=240)
        assert got.returncode == 0, got.stderr[-2000:]
    for name in SMOKE:  # copies outside the repository, so nothing imports this checkout
        shutil.copy(ROOT / "tests" / "unit" / name, tmp_path / name)
    (tmp_path / "test_loaded.py").write_text(
        "from mesh.compiled import HOT_PATH, compiled_modules\n\n\n"
        "def test_compiled():\n    assert compiled_modules() == list(HOT_PATH)\n"
    )
    run = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=importlib",
                          "--rootdir", str(tmp_path), str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "test_loaded.py" not in run.stdout  # no failure lines
    print(run.stdout.splitlines()[-1], file=sys.stderr)
