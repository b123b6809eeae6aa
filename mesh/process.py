"""Process-wide settings for the long-running mesh processes (`mesh broker`, `mesh node`).

Rules of this module: only entry points that own their process call it (the CLI and the
benchmark's own processes), never library code, since it changes global interpreter state.
"""

from __future__ import annotations

import gc
from typing import Final

__all__ = ["tune_for_serving"]

# Every message allocates a few short-lived containers; with CPython's default of a
# young-generation collection every 700 allocations, collections (and their pauses,
# which land in the latency tail) run thousands of times a second. The price: a young
# collection then finds whatever cycles 50,000 allocations left, so the message path must
# leave none (one per command made the node's collections pauses of tens of ms;
# docs/performance.md, "The tail").
GEN0_THRESHOLD: Final = 50_000


def tune_for_serving() -> None:
    """Move start-up objects out of the collector's way and collect the young less often."""
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
