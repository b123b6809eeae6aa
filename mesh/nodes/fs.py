"""The `fs` service: list, read and search text files under one root directory.

Rules of this module:

* The root is a sandbox. Paths are relative to it: an absolute path is refused, and
  every path is resolved (`..` and symlinks followed) and refused with
  `AccessDeniedError` unless it stays inside the resolved root. Symlinks inside the
  root that point inside are followed; entries whose target is outside the root (or
  gone) are left out of listings and searches, so nothing outside is read or described.
* Only regular files are read: a FIFO or device would block a worker or never end.
* Paths in results are relative to the root with `/` separators (`.` is the root).
* Replies stay under one message: reads stop at `READ_LIMIT` bytes of text, listings
  and searches stop early, and each says `truncated`.
* Text is UTF-8 with undecodable bytes replaced; search skips files with a NUL byte in
  their first 8 KiB (binary), files over `MAX_SEARCH_FILE_BYTES`, and does not descend
  into symlinked directories (no loops).
"""

from __future__ import annotations

import codecs
import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from fnmatch import fnmatchcase
from pathlib import Path
from typing import IO, Any, Final

from mesh.node import Node
from mesh.protocol import (
    MAX_MESSAGE_BYTES,
    AccessDeniedError,
    ConfigurationError,
    UnavailableError,
    ValidationFailedError,
)

__all__ = ["node", "READ_LIMIT", "MAX_ENTRIES", "MAX_RESULTS", "MAX_SEARCH_FILE_BYTES"]

# Bytes of text a reply may carry, leaving room for the header and the other fields.
READ_LIMIT: Final = MAX_MESSAGE_BYTES - 64 * 1024
MAX_ENTRIES: Final = 1000
MAX_RESULTS: Final = 1000
MAX_LINE_CHARS: Final = 500
MAX_SEARCH_FILE_BYTES: Final = 8 * 1024 * 1024
BINARY_SNIFF_BYTES: Final = 8192

# errno values that mean "this path is wrong", as opposed to a failing disk.
_BAD_PATH: Final = {
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "not a directory",
    errno.EISDIR: "is a directory",
    errno.ELOOP: "too many levels of symbolic links",
    errno.ENAMETOOLONG: "name too long",
}

_PATH: Final = {
    "type": "string",
    "minLength": 1,
    "maxLength": 4096,
    "description": "A path relative to the root, with '/' separators.",
}
LIST_SCHEMA: Final = {
    "type": "object",
    "properties": {
        "path": {**_PATH, "default": ".", "description": "The directory to list, relative to the root."},
        "pattern": {
            "type": "string",
            "minLength": 1,
            "maxLength": 255,
            "description": "Only names matching this glob, for example '*.md' (case-sensitive).",
        },
    },
    "required": [],
    "additionalProperties": False,
}
READ_SCHEMA: Final = {
    "type": "object",
    "properties": {
        "path": {**_PATH, "description": "The file to read, relative to the root."},
        "max_bytes": {
            "type": "integer",
            "minimum": 1,
            "maximum": READ_LIMIT,
            "default": READ_LIMIT,
            "description": "Read at most this many bytes from the start of the file.",
        },
    },
    "required": ["path"],
    "additionalProperties": False,
}
_TRUNCATED: Final = {"type": "boolean", "description": "Whether something was left out (a limit was reached)."}
_REL: Final = {"type": "string", "description": "The path relative to the root."}
LIST_RESULT: Final = {
    "type": "object",
    "properties": {
        "path": _REL,
        "entries": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "type": {"enum": ["file", "dir"]},
                    "size": {"type": ["integer", "null"], "description": "Bytes of a file; null for a directory."},
                },
                "required": ["name", "type", "size"],
                "additionalProperties": False,
            },
        },
        "truncated": _TRUNCATED,
    },
    "required": ["path", "entries", "truncated"],
    "additionalProperties": False,
}
READ_RESULT: Final = {
    "type": "object",
    "properties": {
        "path": _REL,
        "text": {"type": "string", "description": "The text read (invalid UTF-8 replaced by U+FFFD)."},
        "size": {"type": "integer", "description": "The file's whole size in bytes."},
        "truncated": _TRUNCATED,
    },
    "required": ["path", "text", "size", "truncated"],
    "additionalProperties": False,
}
SEARCH_RESULT: Final = {
    "type": "object",
    "properties": {
        "matches": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "path": _REL,
                    "line": {"type": "integer", "description": "The line number, from 1."},
                    "text": {"type": "string", "description": "The line, or an excerpt around the match."},
                },
                "required": ["path", "line", "text"],
                "additionalProperties": False,
            },
        },
        "truncated": _TRUNCATED,
    },
    "required": ["matches", "truncated"],
    "additionalProperties": False,
}
SEARCH_SCHEMA: Final = {
    "type": "object",
    "properties": {
        "text": {
            "type": "string",
            "minLength": 1,
            "maxLength": 1000,
            "description": "The exact text to find (case-sensitive, within one line).",
        },
        "path": {
            **_PATH,
            "default": ".",
            "description": "The directory (or file) to search, relative to the root.",
        },
        "max_results": {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_RESULTS,
            "default": 100,
            "description": "Return at most this many matching lines.",
        },
    },
    "required": ["text"],
    "additionalProperties": False,
}


@contextmanager
def _os_errors(path: str) -> Iterator[None]:
    """Turn an `OSError` about `path` into the mesh error a caller can act on."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise AccessDeniedError(f"{path}: permission denied", details={"field": "path"}) from None
        if exc.errno in _BAD_PATH:
            raise ValidationFailedError(f"{path}: {_BAD_PATH[exc.errno]}", details={"field": "path"}) from None
        raise UnavailableError(f"{path}: {exc.strerror}", details={"field": "path"}) from None


def _open_regular(path: str, shown: str) -> IO[bytes]:
    """`path` opened for reading, refused unless it is a regular file.

    O_NONBLOCK makes opening a FIFO return at once, so it can be refused instead of
    blocking the worker; on a regular file the flag changes nothing.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        os.close(fd)
        raise
    if not regular:
        os.close(fd)
        raise ValidationFailedError(f"{shown}: not a regular file", details={"field": "path"})
    return os.fdopen(fd, "rb")


class _Sandbox:
    """Path checks and conversions for one resolved root directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def resolve(self, path: str) -> str:
        """The real path that `path` names inside the root.

        Raises:
            AccessDeniedError: `path` is absolute or leads outside the root.
            ValidationFailedError: `path` contains a NUL character.
        """
        if "\x00" in path:
            raise ValidationFailedError("path: contains a NUL character", details={"field": "path"})
        if os.path.isabs(path):
            raise AccessDeniedError(
                f"{path}: absolute paths are refused; give a path relative to the root",
                details={"field": "path"},
            )
        real = os.path.realpath(self.root / path)
        if not self.inside(real):
            raise AccessDeniedError(f"{path}: leads outside the root", details={"field": "path"})
        return real

    def inside(self, real: str) -> bool:
        return Path(real).is_relative_to(self.root)

    def relative(self, path: str) -> str:
        return Path(path).relative_to(self.root).as_posix()

    def describe(self, entry: os.DirEntry[str]) -> dict[str, Any] | None:
        """A listing entry, or None when its target is outside the root, gone or special."""
        real = os.path.realpath(entry.path)
        if not self.inside(real):
            return None
        try:
            st = os.stat(real)
        except OSError:
            return None
        if stat.S_ISDIR(st.st_mode):
            return {"name": entry.name, "type": "dir", "size": None}
        if stat.S_ISREG(st.st_mode):
            return {"name": entry.name, "type": "file", "size": st.st_size}
        return None

    def files(self, start: str) -> Iterator[str]:
        """Files under `start` (itself when not a directory) whose real path is inside the root.

        Sorted walk order, so results are stable from one call to the next.
        """
        if not os.path.isdir(start):
            yield start
            return
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if self.inside(os.path.realpath(path)):
                    yield path


def _excerpt(line: str, needle: str) -> str:
    """At most `MAX_LINE_CHARS` of `line`, including where `needle` occurs."""
    if len(line) <= MAX_LINE_CHARS:
        return line
    start = max(0, line.index(needle) - MAX_LINE_CHARS // 4)
    return line[start : start + MAX_LINE_CHARS]


def _decode(data: bytes, complete: bool) -> str:
    """UTF-8 text of `data`; when `complete` is False a character cut at the end is dropped."""
    return codecs.getincrementaldecoder("utf-8")("replace").decode(data, final=complete)


def _text_lines(path: str) -> Iterator[tuple[int, str]]:
    """Numbered lines of a text file; nothing for binary, oversized or unreadable files."""
    try:
        with _open_regular(path, path) as f:
            if os.fstat(f.fileno()).st_size > MAX_SEARCH_FILE_BYTES or b"\0" in f.read(BINARY_SNIFF_BYTES):
                return
            f.seek(0)
            for number, raw in enumerate(f, 1):
                yield number, raw.decode("utf-8", "replace").rstrip("\r\n")
    except (OSError, ValidationFailedError):
        return


def node(root: str = "var/files") -> Node:
    """The fs node, serving the files under `root`.

    Args:
        root: an existing directory; nothing outside it can be read or listed.

    Returns:
        A `Node` named "fs" offering `fs.list`, `fs.read` and `fs.search`.

    Raises:
        ConfigurationError: `root` is not an existing directory.
    """
    if not isinstance(root, str) or not root or not os.path.isdir(root):
        raise ConfigurationError(
            f"fs: root {root!r} is not an existing directory (run `python -m mesh.nodes.sample var` for the sample)",
            details={"field": "root"},
        )
    box = _Sandbox(Path(os.path.realpath(root)))
    n = Node("fs")

    @n.action(
        "fs", "list", schema=LIST_SCHEMA, idempotent=True, read_only=True, open_world=False,
        result_schema=LIST_RESULT,
        description="List the files and directories in a directory, sorted by name.",
    )
    def list_dir(payload: dict[str, Any]) -> dict[str, Any]:
        return _list(box, payload)

    @n.action(
        "fs", "read", schema=READ_SCHEMA, idempotent=True, read_only=True, open_world=False,
        result_schema=READ_RESULT,
        description="Read a text file (UTF-8), up to max_bytes from its start.",
    )
    def read(payload: dict[str, Any]) -> dict[str, Any]:
        return _read(box, payload)

    @n.action(
        "fs", "search", schema=SEARCH_SCHEMA, idempotent=True, read_only=True, open_world=False,
        result_schema=SEARCH_RESULT,
        description="Find lines containing a text (case-sensitive) in the text files under a path.",
    )
    def search(payload: dict[str, Any]) -> dict[str, Any]:
        return _search(box, payload)

    return n


def _list(box: _Sandbox, payload: dict[str, Any]) -> dict[str, Any]:
    """`fs.list`: the entries of a directory under the root, at most MAX_ENTRIES."""
    shown = payload.get("path", ".")
    real = box.resolve(shown)
    pattern = payload.get("pattern")
    with _os_errors(shown), os.scandir(real) as it:
        found = sorted(it, key=lambda e: e.name)
    entries: list[dict[str, Any]] = []
    truncated = False
    for entry in found:
        if pattern is not None and not fnmatchcase(entry.name, pattern):
            continue
        described = box.describe(entry)
        if described is None:
            continue
        if len(entries) == MAX_ENTRIES:
            truncated = True
            break
        entries.append(described)
    return {"path": box.relative(real), "entries": entries, "truncated": truncated}


def _read(box: _Sandbox, payload: dict[str, Any]) -> dict[str, Any]:
    """`fs.read`: the start of a text file under the root, at most READ_LIMIT bytes encoded."""
    shown = payload["path"]
    real = box.resolve(shown)
    limit = int(payload.get("max_bytes", READ_LIMIT))
    with _os_errors(shown), _open_regular(real, shown) as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(limit + 1)
    truncated = len(data) > limit
    text = _decode(data[:limit], not truncated)
    encoded = text.encode()
    if len(encoded) > READ_LIMIT:  # replaced bytes grow from 1 to 3 bytes each
        text = _decode(encoded[:READ_LIMIT], False)
        truncated = True
    return {"path": box.relative(real), "text": text, "size": size, "truncated": truncated}


def _search(box: _Sandbox, payload: dict[str, Any]) -> dict[str, Any]:
    """`fs.search`: lines holding a text in the files under a path, within READ_LIMIT bytes."""
    needle = payload["text"]
    shown = payload.get("path", ".")
    real = box.resolve(shown)
    limit = int(payload.get("max_results", 100))
    with _os_errors(shown):
        os.stat(real)  # a missing start is the caller's mistake, not an empty result
    matches: list[dict[str, Any]] = []
    budget = READ_LIMIT
    for path in box.files(real):
        rel = box.relative(path)
        for number, line in _text_lines(path):
            if needle not in line:
                continue
            text = _excerpt(line, needle)
            budget -= len(rel) + len(text.encode()) + 32
            if len(matches) == limit or budget < 0:
                return {"matches": matches, "truncated": True}
            matches.append({"path": rel, "line": number, "text": text})
    return {"matches": matches, "truncated": False}
