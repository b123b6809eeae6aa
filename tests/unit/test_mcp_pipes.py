"""The bridge's stdin lines: split as sent, an oversized one dropped without losing the next."""

from __future__ import annotations

import asyncio

import pytest

from mesh.mcp import pipes
from mesh.mcp.pipes import TOO_LONG, LineReader


def read_all(chunks: list[bytes], max_line: int, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setattr(pipes, "MAX_LINE", max_line)

    async def run() -> list[str]:
        reader = asyncio.StreamReader()
        for chunk in chunks:
            reader.feed_data(chunk)
        reader.feed_eof()
        return [line async for line in LineReader(reader)]

    return asyncio.run(run())


def test_lines_come_out_as_they_went_in_whatever_the_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Invariant: the lines read are exactly the lines written, however the bytes were cut."""
    data = b'{"id": 1}\n{"id": 2, "text": "\xc3\xa9"}\n\n{"id": 3}'
    for cut in range(1, len(data)):
        lines = read_all([data[:cut], data[cut:]], 1024, monkeypatch)
        assert lines == ['{"id": 1}\n', '{"id": 2, "text": "é"}\n', "\n", '{"id": 3}'], cut


def test_an_oversized_line_is_one_non_json_line_and_the_next_one_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """Invariant: a line past MAX_LINE becomes one TOO_LONG (the SDK answers a parse error);
    the lines around it arrive intact, however the long one was cut."""
    long = b"x" * 300
    for chunks in ([b'{"a": 1}\n' + long + b'\n{"b": 2}\n'], [b'{"a": 1}\n', long[:200], long[200:], b'\n{"b": 2}\n']):
        assert read_all(chunks, 100, monkeypatch) == ['{"a": 1}\n', TOO_LONG, '{"b": 2}\n']
    assert read_all([b'{"a": 1}\n' + long], 100, monkeypatch) == ['{"a": 1}\n']  # cut off at EOF: nothing made up
