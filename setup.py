"""Extension modules for a compiled wheel; everything else is in pyproject.toml.

The build backend (`build_backend/mesh_build.py`) sets `MESH_BUILD_COMPILED=1` for a
wheel it can compile; then the modules of `mesh.compiled.HOT_PATH` are compiled with
mypyc, from the same `.py` sources, against the project's mypy configuration. Otherwise
(editable installs, `MESH_PURE_PYTHON=1`, no C compiler) there are no extension modules.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

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


def ext_modules() -> list:
    if os.environ.get("MESH_BUILD_COMPILED") != "1":
        return []
    from mypyc.build import mypycify

    paths = [name.replace(".", "/") + ".py" for name in hot_path()]
    # The overrides in pyproject.toml name modules outside this build, and the build
    # environment has mypy only (not the dependencies): neither is an error here.
    return mypycify(["--config-file", "pyproject.toml", "--no-warn-unused-configs",
                     "--ignore-missing-imports", *paths],
                    opt_level="3", group_name="mesh")


setup(ext_modules=ext_modules())
