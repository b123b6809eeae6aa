"""The in-memory Raft log of one node: a snapshot followed by entries.

Rules of this module:

* Indexes start at 1; index 0 (term 0) is the empty snapshot every log starts from.
  `entries[i]` always has index `snapshot.index + 1 + i`.
* `stable` is the last index the application has persisted; everything after it is
  what the next `Ready` asks it to write. Overwriting a conflicting suffix moves
  `stable` back, so the rewritten entries are persisted again (storage truncates).
* `commit` never decreases; `applied <= commit`; only applied entries are compacted.
* No I/O and no clock: the node owns one of these and the application owns the disk.
"""

from __future__ import annotations

from collections.abc import Sequence

from .messages import Entry, Snapshot

__all__ = ["RaftLog"]


class RaftLog:
    """Entries after a snapshot, with the commit, applied and stable marks.

    Args:
        snapshot: the last snapshot persisted (the empty one for a new node).
        entries: the persisted entries after it, consecutive.
        commit: the persisted commit index.
    """

    def __init__(self, snapshot: Snapshot | None = None, entries: Sequence[Entry] = (), commit: int = 0) -> None:
        self.snapshot = snapshot or Snapshot()
        self.entries: list[Entry] = list(entries)
        self.commit = max(commit, self.snapshot.index)
        self.applied = self.snapshot.index
        self.stable = self.last_index

    @property
    def first_index(self) -> int:
        """The first index still held as an entry (not compacted)."""
        return self.snapshot.index + 1

    @property
    def last_index(self) -> int:
        return self.entries[-1].index if self.entries else self.snapshot.index

    @property
    def last_term(self) -> int:
        return self.entries[-1].term if self.entries else self.snapshot.term

    def term(self, index: int) -> int | None:
        """The term at `index`; None when compacted away or past the end."""
        offset = index - self.snapshot.index
        if offset == 0:
            return self.snapshot.term
        if 0 < offset <= len(self.entries):
            return self.entries[offset - 1].term
        return None

    def slice(self, lo: int, hi: int) -> list[Entry]:
        """Entries with `lo <= index <= hi`; `lo` must not be compacted."""
        base = self.snapshot.index + 1
        return self.entries[lo - base : hi - base + 1]

    def batch(self, lo: int, hi: int, max_bytes: int) -> list[Entry]:
        """Entries from `lo` up to `hi` whose data add up to at most `max_bytes`, but never
        none: one message's worth, however large a single entry is."""
        out: list[Entry] = []
        size = 0
        for entry in self.slice(lo, hi):
            size += len(entry.data)
            if out and size > max_bytes:
                break
            out.append(entry)
        return out

    def unstable(self) -> list[Entry]:
        """Entries not yet persisted."""
        return self.slice(self.stable + 1, self.last_index)

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """The election restriction: is a log ending at (last_index, last_term) at least as new?"""
        return (last_term, last_index) >= (self.last_term, self.last_index)

    def append(self, entries: Sequence[Entry]) -> None:
        """Add entries after `entries[0].index - 1`, dropping whatever was there.

        Callers pass only entries past the first conflict, so a committed entry is never
        dropped (the node checks this and `find_conflict` guarantees it).
        """
        if not entries:
            return
        first = entries[0].index
        del self.entries[first - self.snapshot.index - 1 :]
        self.entries.extend(entries)
        self.stable = min(self.stable, first - 1)

    def find_conflict(self, entries: Sequence[Entry]) -> int:
        """Position in `entries` of the first one this log lacks or holds with another term."""
        for pos, entry in enumerate(entries):
            if self.term(entry.index) != entry.term:
                return pos
        return len(entries)

    def first_index_of_term(self, index: int) -> int:
        """The first index of the run of entries with the term found at `index`."""
        term = self.term(index)
        while index - 1 > self.commit and self.term(index - 1) == term:
            index -= 1
        return index

    def last_index_of_term(self, term: int, upto: int) -> int | None:
        """The highest index `<= upto` holding `term`, or None if this log has none."""
        index = min(upto, self.last_index)
        while index >= self.snapshot.index:
            found = self.term(index)
            if found is None or found < term:
                return None
            if found == term:
                return index
            index -= 1
        return None

    def restore(self, snapshot: Snapshot) -> None:
        """Replace the whole log by a snapshot from the leader."""
        self.snapshot = snapshot
        self.entries = []
        self.commit = self.applied = self.stable = snapshot.index

    def compact(self, index: int, data: bytes) -> Snapshot:
        """Drop entries up to `index` (applied) behind a new snapshot of the state there."""
        term = self.term(index)
        assert term is not None  # the node checked snapshot.index <= index <= applied
        self.entries = self.entries[index - self.snapshot.index :]
        self.snapshot = Snapshot(index, term, data)
        return self.snapshot
