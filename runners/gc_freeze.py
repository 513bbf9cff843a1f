"""Keep Python's garbage collector out of a capture loop."""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def frozen_gc() -> Iterator[None]:
    """Freeze and pause the collector for the loop.

    A collection in the middle of a capture walks every tracked object (tens of ms in a server process,
    per capture) and can free tensors whose memory the capture is about to reuse. Freezing moves every
    object there is out of the collector's sight, and pausing it keeps new ones from triggering a
    collection: the loop pays none. Nor is one paid up front: garbage left from before is thawed with the
    rest after the loop and waits for the collector's next run (a full collection of a server's heap took
    0.17 s on an H200 host).
    """
    # gc.unfreeze() thaws everything, including what the server froze itself: so where the server froze its
    # heap, freeze nothing more (garbage frozen now would never be thawed, nor freed): pausing is enough.
    server_froze = gc.get_freeze_count() > 0
    if not server_froze:
        gc.freeze()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if not server_froze:
            gc.unfreeze()
        if was_enabled:
            gc.enable()
