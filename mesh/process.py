"""Process-wide settings for the long-running mesh processes (`mesh broker`, `mesh node`).

Rules of this module: only entry points that own their process call it (the CLI and the
benchmark's own processes), never library code, since it changes global interpreter state.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading
import time
from typing import Final

__all__ = ["TRIM_S", "return_freed_memory", "tune_for_serving"]

# Every message allocates a few short-lived containers; with CPython's default of a
# young-generation collection every 700 allocations, collections (and their pauses,
# which land in the latency tail) run thousands of times a second. The price: a young
# collection then finds whatever cycles 50,000 allocations left, so the message path must
# leave none (one per command made the node's collections pauses of tens of ms;
# docs/performance.md, "The tail").
GEN0_THRESHOLD: Final = 50_000
# How often a serving process hands the memory its allocator keeps back to the system.
TRIM_S: Final = 10.0


def tune_for_serving() -> None:
    """Move start-up objects out of the collector's way and collect the young less often."""
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)


def return_freed_memory(every: float = TRIM_S) -> bool:
    """Hand the memory freed in this process back to the system every `every` seconds.

    libzmq frees a connection's buffers (30 to 40 KB each) when its peer leaves, but glibc
    keeps freed memory for reuse, so a broker that once held 10,000 clients kept their
    memory after they left. `malloc_trim(0)` returns it; a daemon thread calls it. With
    nothing to return it takes microseconds; after a thousand links closed, a few
    milliseconds, holding the allocator's locks meanwhile.

    Returns:
        Whether the thread runs: False where the C library has no `malloc_trim` (not glibc).
    """
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if trim is None:
        return False

    def run() -> None:
        while True:  # a daemon: it ends with the process
            time.sleep(every)
            trim(0)

    threading.Thread(target=run, name="mesh-trim", daemon=True).start()
    return True
