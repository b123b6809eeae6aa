"""The build backend: setuptools', with the hot path compiled by mypyc in wheels.

Rules of this module:

* A wheel (`pip install .`, `pip wheel .`, `python -m build`) compiles the modules of
  `mesh.compiled.HOT_PATH` when a C compiler and Python's headers are there, asking
  for mypy (which ships mypyc) as a build requirement only then.
* `MESH_PURE_PYTHON=1` at build time, or no compiler, builds the pure-Python wheel.
* An editable install (`pip install -e .`, what `make test` uses) is always pure Python:
  a compiled module beside its `.py` would shadow the source, and tests would run stale
  code after every edit.
* An sdist is sources only; the wheel built from it decides for itself.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import (  # noqa: F401 - the rest of PEP 517 and 660, as setuptools has them
    build_sdist,
    get_requires_for_build_editable,
    get_requires_for_build_sdist,
    prepare_metadata_for_build_editable,
    prepare_metadata_for_build_wheel,
)

MYPY = "mypy>=2.4"  # mypyc ships with mypy; the same version `make lint` checks the types with
FLAG = "MESH_BUILD_COMPILED"  # read by setup.py


def compiling() -> bool:
    """Whether a wheel built now gets compiled modules (and says why not when it does not)."""
    if os.environ.get("MESH_PURE_PYTHON", "") not in ("", "0"):
        return False
    compiler = shlex.split(sysconfig.get_config_var("CC") or "cc")[:1]
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not compiler or shutil.which(compiler[0]) is None or not headers.exists():
        print(f"mesh: no C compiler ({' '.join(compiler) or 'cc'}) or no {headers}: building pure Python",
              file=sys.stderr)
        return False
    return True


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    """setuptools' requirements, and mypy when the wheel is compiled."""
    extra = [MYPY] if compiling() else []
    return [*_setuptools.get_requires_for_build_wheel(config_settings), *extra]


def build_wheel(
    wheel_directory: str, config_settings: dict[str, Any] | None = None, metadata_directory: str | None = None
) -> str:
    """The wheel, compiled when `compiling()`."""
    os.environ[FLAG] = "1" if compiling() else "0"
    try:
        return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)
    finally:
        del os.environ[FLAG]


def build_editable(
    wheel_directory: str, config_settings: dict[str, Any] | None = None, metadata_directory: str | None = None
) -> str:
    """The editable wheel: always pure Python (see the module's rules)."""
    os.environ[FLAG] = "0"
    try:
        return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
    finally:
        del os.environ[FLAG]
