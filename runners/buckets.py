"""Which padded batch size (bucket) a live batch runs at."""

from __future__ import annotations

from typing import Sequence

DEFAULT_MAX_BATCH_SIZE = 256
DEFAULT_MAX_TOKENS = 4096


def default_decode_buckets(max_bs: int) -> list[int]:
    """1, 2, 4, 8, 12, 16, 24, ..., 256 (step 8 from 16), capped at ``max_bs``; ``max_bs`` always included.

    Small batches get dense buckets because decode latency there is dominated by launch overhead and a
    padded row costs almost as much as a real one; step 8 above that keeps the graph count (and capture
    time, and pool memory) bounded.
    """
    if max_bs < 1:
        raise ValueError(f"max_bs must be a positive integer, got {max_bs}")
    candidates = [1, 2, 4, 8, 12, *range(16, DEFAULT_MAX_BATCH_SIZE + 1, 8)]
    buckets = [b for b in candidates if b < max_bs]
    return [*buckets, max_bs]


def default_prefill_buckets(max_tokens: int) -> list[int]:
    """4..32 step 4, 48..256 step 16, 288..512 step 32, 576..1024 step 64, 1280..4096 step 256, capped at
    ``max_tokens``; ``max_tokens`` always included.

    Padding costs a prefill in proportion to the padded tokens, so steps grow with the token count: the
    padding stays under about 1/4 of a bucket, and capture time and pool memory stay bounded.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens}")
    candidates = [
        *range(4, 33, 4),
        *range(48, 257, 16),
        *range(288, 513, 32),
        *range(576, 1025, 64),
        *range(1280, DEFAULT_MAX_TOKENS + 1, 256),
    ]
    return [*(b for b in candidates if b < max_tokens), max_tokens]


def check_buckets(buckets: Sequence[int], what: str = "buckets") -> list[int]:
    """Return ``buckets`` as a list, or raise ValueError saying what is wrong with it."""
    values = list(buckets)
    if not values:
        raise ValueError(f"{what} must not be empty")
    if not all(isinstance(b, int) and not isinstance(b, bool) for b in values):
        raise ValueError(f"{what} must be integers, got {values}")
    if any(b <= 0 for b in values):
        raise ValueError(f"{what} must be positive, got {values}")
    if any(a >= b for a, b in zip(values, values[1:])):
        raise ValueError(f"{what} must be strictly increasing (sorted, no repeats), got {values}")
    return values


class BucketPolicy:
    """Maps a live batch size to the smallest bucket that holds it, in O(1) on the hot path."""

    def __init__(self, buckets: Sequence[int]) -> None:
        self.buckets = check_buckets(buckets)
        self.max_size = self.buckets[-1]
        # One entry per live size 0..max: a list index beats a bisect on every decode step.
        self._bucket_for_size: list[int] = []
        for bucket in self.buckets:
            self._bucket_for_size.extend([bucket] * (bucket + 1 - len(self._bucket_for_size)))

    def fits(self, size: int) -> bool:
        return 1 <= size <= self.max_size

    def bucket_for(self, size: int) -> int:
        """The smallest bucket >= ``size``; the caller checks ``fits`` first."""
        return self._bucket_for_size[size]

    def keep_only(self, buckets: Sequence[int]) -> None:
        """Serve only ``buckets`` (its largest the current one): what a graph budget left to capture."""
        self.__init__(buckets)  # type: ignore[misc]

    def capture_order(self) -> list[int]:
        """Largest first: later, smaller captures then reuse the pool memory the largest one reserved."""
        return sorted(self.buckets, reverse=True)
