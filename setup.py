"""Extension modules for a compiled wheel; everything else is in pyproject.toml.

The build backend (`build_backend/mesh_build.py`) sets `MESH_BUILD_COMPILED=1` for a
wheel it can compile; then the modules of `mesh.compiled.HOT_PATH` are compiled with
mypyc, from the same `.py` sources, against the project's mypy configuration. Otherwise
(editable installs, `MESH_PURE_PYTHON=1`, no C compiler) there are no extension modules.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from setuptools import setup

HERE = Path(__file__).resolve().parent


def hot_path() -> tuple[str, ...]:
    """`mesh.compiled.HOT_PATH`, read without importing the package (its dependencies
    are not in the build environment)."""
    spec = importlib.util.spec_from_file_location("_mesh_compiled", HERE / "mesh" / "compiled.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return tuple(module.HOT_PATH)


def compiled(scratch: str) -> dict[str, Any]:
    """`setup()`'s arguments for the compiled modules: none unless the backend asks.

    Each compiled build starts from an empty build directory of its own (`scratch`): setuptools adds
    whatever its `build/lib.*` holds to the wheel, and an extension module left there by
    an earlier build with a longer `HOT_PATH` would shadow its source in the new wheel.
    """
    if os.environ.get("MESH_BUILD_COMPILED") != "1":
        return {}
    from mypyc.build import mypycify

    paths = [name.replace(".", "/") + ".py" for name in hot_path()]
    # The overrides in pyproject.toml name modules outside this build, and the build
    # environment has mypy only (not the dependencies): neither is an error here.
    modules = mypycify(["--config-file", "pyproject.toml", "--no-warn-unused-configs",
                        "--ignore-missing-imports", *paths],
                       opt_level="3", group_name="mesh", target_dir=os.path.join(scratch, "c"))
    return {"ext_modules": modules, "options": {"build": {"build_base": scratch}}}


scratch = tempfile.mkdtemp(prefix="mesh-build-")
try:
    setup(**compiled(scratch))
finally:
    shutil.rmtree(scratch, ignore_errors=True)
