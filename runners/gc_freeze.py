"""Keep Python's garbage collector out of a capture loop."""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def frozen_gc() -> Iterator[None]:
    """Collect once, then freeze and pause the collector for the loop.

    A collection in the middle of a capture walks every tracked object (tens of ms in a server process,
    per capture) and can free tensors whose memory the capture is about to reuse. Freezing moves the
    survivors out of the collector's sight, so the single collection here is the only one the loop pays.
    """
    # gc.unfreeze() thaws everything, including what the server froze itself: only thaw if nothing was.
    server_froze = gc.get_freeze_count() > 0
    gc.collect()
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
