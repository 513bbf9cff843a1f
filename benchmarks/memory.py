"""Memory between measurements: what one measurement set up is gone before the next one is set up.

A setup time or a pool is a measurement's own only if nothing of an earlier one is still alive. Releasing also
forgets every torch.compile result and cudagraph tree, so each size's compiled contenders compile afresh
(Inductor's on-disk caches still make later sizes faster) and per-size recompiles never reach dynamo's
recompile limit, past which it silently runs the step eagerly. It must never happen while something set up
before it may still run: the harness releases around each measurement (``measured_apart``), never inside
one, except between the two captures of the capture cost, which must not share memory either.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator

import torch

import hal


def release_memory(device: hal.Device) -> None:
    """Free what finished measurements held and forget everything torch.compile compiled."""
    torch._dynamo.reset()
    if device.torch_device.type == "cuda":
        # Graphs and their pools can sit in reference cycles; only a collection returns their memory to the
        # allocator. Elsewhere it is skipped: with torch loaded one collection takes ~0.25 s on a small CPU,
        # and pool sizes there are counted per pool, not read from an allocator.
        gc.collect()
        torch.cuda.empty_cache()


@contextlib.contextmanager
def measured_apart(device: hal.Device) -> Iterator[None]:
    """One measurement with nothing of another alive: released before it is set up and after it ends, failed or
    not. What it set up must be unreachable when the block ends (held by a function that has returned)."""
    release_memory(device)
    try:
        yield
    finally:
        release_memory(device)
