"""`mesh init`: a ready quickstart in a directory, from files shipped inside the package.

A user who installed the package from PyPI has no repository: the topology, the sample
data and the next steps come from here, the same topology `make run` starts in the
repository (topologies/quickstart.toml points at `mesh.toml` beside this module).

Rules of this module: nothing that exists is overwritten. An existing `mesh.toml` stops
the whole init with an error naming it; the sample data is refreshed in place, as
`python -m mesh.nodes.sample` does, since it is the same every time.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Final

from ..protocol import ConfigurationError

__all__ = ["TOPOLOGY", "init"]

TOPOLOGY: Final = "mesh.toml"  # what `mesh up` reads when given no file
README: Final = "README.md"


def init(directory: Path) -> list[str]:
    """Write the quickstart into `directory` (created when missing).

    Returns:
        One line per thing written, for the user.

    Raises:
        ConfigurationError: `directory` already holds a `mesh.toml`, is not a directory, or
            cannot be created or written (the OS reason in the message).
    """
    from mesh.nodes.sample import prepare

    topology = directory / TOPOLOGY
    if topology.exists():
        raise ConfigurationError(f"{topology} exists; mesh init writes a new quickstart only into a directory "
                                 "without one", details={"path": str(topology)})
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigurationError(f"{directory} is not a directory", details={"path": str(directory)}) from None
    except OSError as err:
        raise ConfigurationError(f"cannot create {directory}: {err.strerror}", details={"path": str(directory)}) from None
    shipped = files(__name__)
    done = []
    try:
        topology.write_text(shipped.joinpath(TOPOLOGY).read_text(encoding="utf-8"), encoding="utf-8")
        done.append(f"wrote {topology}")
        readme = directory / README
        if not readme.exists():
            readme.write_text(shipped.joinpath(README).read_text(encoding="utf-8"), encoding="utf-8")
            done.append(f"wrote {readme}")
        done.append(prepare(directory / "var"))
    except OSError as err:
        raise ConfigurationError(f"cannot write the quickstart into {directory}: {err.strerror}",
                                 details={"path": str(err.filename or directory)}) from None
    return done
