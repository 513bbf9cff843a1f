"""Per-phase graph configuration."""

from __future__ import annotations

import os
from dataclasses import dataclass

from runners.buckets import DEFAULT_MAX_BATCH_SIZE, check_buckets, default_decode_buckets

BREAKABLE_DEBUG_ENV = "GRAPHHAL_BREAKABLE_DEBUG"


@dataclass
class DecodeConfig:
    """How a ``DecodeRunner`` captures and runs.

    mode:            a graph mode the device offers (``"full"``), or ``"disabled"`` to run eagerly through
                     the same API (to tell a graph bug from a model bug, or on devices without graphs).
    max_bs:          the largest live batch that runs on a graph; defaults to the largest bucket, or 256.
    buckets:         padded batch sizes to capture, strictly increasing; the last must equal ``max_bs``.
                     Default: ``default_decode_buckets(max_bs)``.
    eager_fallback:  run batches larger than ``max_bs`` eagerly (True) or raise (False).
    warmup_runs:     eager runs of the forward per bucket before its capture (lazy init, autotuning and
                     allocator warm-up must not happen inside a capture).
    show_progress:   a progress bar over the buckets while capturing.
    breakable_debug: in mode ``breakable``, capture the whole forward as one eager step, run through the same
                     capture and replay path: if results go right this way and wrong with real segments, the
                     bug is in the graph, not the model. Also switched on by GRAPHHAL_BREAKABLE_DEBUG=1.
    """

    mode: str = "full"
    max_bs: int | None = None
    buckets: list[int] | None = None
    eager_fallback: bool = True
    warmup_runs: int = 1
    show_progress: bool = True
    breakable_debug: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.mode, str) or not self.mode:
            raise ValueError(f"mode must be a non-empty string, got {self.mode!r}")
        if self.max_bs is not None and (not isinstance(self.max_bs, int) or self.max_bs < 1):
            raise ValueError(f"max_bs must be a positive integer, got {self.max_bs!r}")
        if self.buckets is not None:
            self.buckets = check_buckets(self.buckets)
            if self.max_bs is None:
                self.max_bs = self.buckets[-1]
            elif self.buckets[-1] != self.max_bs:
                raise ValueError(
                    f"the largest bucket ({self.buckets[-1]}) must equal max_bs ({self.max_bs}): "
                    "every batch size up to max_bs needs a bucket, and none may exceed it"
                )
        else:
            if self.max_bs is None:
                self.max_bs = DEFAULT_MAX_BATCH_SIZE
            self.buckets = default_decode_buckets(self.max_bs)
        if os.environ.get(BREAKABLE_DEBUG_ENV, "") not in ("", "0"):
            self.breakable_debug = True
        if self.warmup_runs < 1:
            raise ValueError(f"warmup_runs must be at least 1 (capture needs a warmed-up forward), got {self.warmup_runs}")
