"""Writing secrets and keys to disk: atomically, owner-only, surviving a crash.

Every key, token and ring file of the security layer is written here, so none is ever
half-written or readable by others, even for a moment.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from ..protocol import ConfigurationError

__all__ = ["write_file_atomic"]


def write_file_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` atomically, with `mode` from the first byte written.

    Readers see the old file or the new one, never half of one, and a secret is never
    readable by others even briefly (the temporary file is created 0600). The directory
    is synced too, so the new name survives a power loss.

    Args:
        path: the file to replace; its directory must exist.
        data: the whole new content.
        mode: the new file's permissions (0600 for secrets, 0644 for public keys).

    Raises:
        ConfigurationError: the file cannot be written.
    """
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError:
        raise ConfigurationError(f"cannot write {path}", details={"reason": "cannot write the file", "path": str(path)}) from None
    try:
        with os.fdopen(fd, "wb") as f:  # mkstemp made it 0600
            if mode != 0o600:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _sync_directory(path.parent)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ConfigurationError(f"cannot write {path}", details={"reason": "cannot write the file", "path": str(path)}) from None


def _sync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
