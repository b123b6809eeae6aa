"""Stdin and stdout as asyncio pipes for the SDK's stdio transport: no thread per line.

The SDK's `stdio_server` reads each line and writes and flushes each answer through a
worker thread: three thread hops per tool call, measured at about a third of what the
bridge added to a call over stdio. Given stream objects of its own, the SDK keeps its
framing and validation and only the reading and writing change: here they are
asyncio's pipe transports on the loop itself.

Rules of this module:

* Only pipes and sockets take this path (what an MCP client spawning the bridge gives).
  A terminal or a regular file does not: making a terminal non-blocking would change it
  for the shell that shares it. `pipe_streams` then yields None and the SDK's own
  threads serve.
* While serving, fd 0 reads /dev/null and fd 1 writes to stderr (as the SDK does), so
  stray output of a library cannot corrupt the protocol; both are restored after.
* A line longer than `MAX_LINE` is skipped to its end and handed on as a line that is
  not JSON: the SDK answers it with a parse error and the session goes on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Final

__all__ = ["MAX_LINE", "pipe_streams", "line_pipes", "LineReader", "LineWriter"]

log = logging.getLogger(__name__)

MAX_LINE: Final = 64 * 1024 * 1024  # bytes of one JSON-RPC message
READ_SIZE: Final = 256 * 1024
TOO_LONG: Final = "line too long"  # not JSON: the SDK answers it with a parse error


class LineReader:
    """The lines of a pipe as text, for `async for` (what the SDK's reader iterates)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf known to hold no newline
        self._dropping = False  # inside a line longer than MAX_LINE

    def __aiter__(self) -> LineReader:
        return self

    async def __anext__(self) -> str:
        while True:
            end = self._buf.find(b"\n", self._scanned)
            if end >= 0:
                line = bytes(self._buf[: end + 1])
                del self._buf[: end + 1]
                self._scanned = 0
                if self._dropping or end >= MAX_LINE:
                    self._dropping = False
                    log.warning("dropped a message longer than %d bytes", MAX_LINE)
                    return TOO_LONG
                return line.decode("utf-8", errors="replace")
            if len(self._buf) > MAX_LINE:
                self._dropping = True
                self._buf.clear()
            self._scanned = len(self._buf)
            chunk = await self._reader.read(READ_SIZE)
            if not chunk:
                if self._buf and not self._dropping:  # a last line without its newline
                    line, self._buf = bytes(self._buf), bytearray()
                    return line.decode("utf-8", errors="replace")
                raise StopAsyncIteration
            self._buf += chunk


class LineWriter:
    """Text written to a pipe (what the SDK's writer calls)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    async def write(self, text: str) -> None:
        self._writer.write(text.encode("utf-8"))

    async def flush(self) -> None:
        await self._writer.drain()

    async def close(self) -> None:
        """Close the pipe once what was written has gone (5 s at most)."""
        self._writer.close()
        with suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), 5)


async def line_pipes(read_fd: int, write_fd: int) -> tuple[LineReader, LineWriter]:
    """Lines read from `read_fd` and written to `write_fd`, both pipes driven by the running loop.

    The descriptors become the streams' own: closing the writer closes `write_fd`.
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_SIZE)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", 0))
    transport, protocol = await loop.connect_write_pipe(
        lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()), os.fdopen(write_fd, "wb", 0))
    return LineReader(reader), LineWriter(asyncio.StreamWriter(transport, protocol, None, loop))


def _is_pipe(fd: int) -> bool:
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


@asynccontextmanager
async def pipe_streams() -> AsyncIterator[tuple[LineReader, LineWriter] | None]:
    """This process's stdin and stdout as loop-driven streams; None when they are not pipes."""
    if not (_is_pipe(0) and _is_pipe(1)):
        yield None
        return
    wire_in, wire_out = os.dup(0), os.dup(1)
    saved_in, saved_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    writer: LineWriter | None = None
    try:
        reader, writer = await line_pipes(wire_in, wire_out)
        yield reader, writer
    finally:
        if writer is not None:
            await writer.close()
        os.dup2(saved_in, 0)
        os.dup2(saved_out, 1)
        os.close(saved_in)
        os.close(saved_out)
