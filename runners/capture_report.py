"""What a runner's ``capture()`` built, as one loggable line."""

from __future__ import annotations

from dataclasses import dataclass

from hal import MIB


@dataclass(frozen=True)
class CaptureReport:
    phase: str
    mode: str
    device: str
    buckets: tuple[int, ...]  # in capture order, largest first
    seconds: float
    pool_bytes: int  # the pool after the capture (a shared pool: what every runner in it holds)
    added_bytes: tuple[int, ...] = ()  # pool bytes each bucket added, in capture order (the first: the largest)
    estimate_bytes: int = 0  # what the pool was estimated at before the other buckets (the largest alone)
    # Device-wide bytes each bucket took, in capture order (the pool's share plus graph objects, executable
    # graphs, communicators' buffers); None entries where the device does not report free memory.
    device_bytes: tuple[int | None, ...] = ()
    bucket_seconds: tuple[float, ...] = ()  # each bucket's warm-up and capture, in capture order
    query_tokens: int = 1  # tokens per request of a decode graph (1 + k for a speculative verify step)

    def summary(self) -> str:
        if not self.buckets:
            return f"graphhal: {self.phase} runs eagerly on {self.device} (mode {self.mode}); nothing captured"
        sizes = f"{self.buckets[0]}" if len(self.buckets) == 1 else f"{self.buckets[0]}..{self.buckets[-1]}"
        others = sum(self.added_bytes[1:])
        device = self.device_total_bytes
        device_wide = "" if device is None else f"; device-wide {device / MIB:.1f} MiB"
        return (
            f"graphhal: captured {len(self.buckets)} {self.phase} graphs{self._per_request()} ({self.mode}, {self.device}) "
            f"for sizes {sizes} in {self.seconds:.2f} s, pool {self.pool_bytes / MIB:.1f} MiB "
            f"(bucket {self.buckets[0]} {self.estimate_bytes / MIB:.1f} MiB, the other buckets {others / MIB:.1f} MiB more)"
            f"{device_wide}"
        )

    @property
    def device_total_bytes(self) -> int | None:
        """Device-wide bytes the whole capture took (None where the device does not report free memory)."""
        if not self.device_bytes or any(b is None for b in self.device_bytes):
            return None
        return sum(b for b in self.device_bytes if b is not None)

    def bucket_device_bytes(self) -> dict[int, int | None]:
        """Device-wide bytes each bucket took, by bucket: its pool share plus what sits outside the pool."""
        return dict(zip(self.buckets, self.device_bytes))

    def _per_request(self) -> str:
        return f" at 1+{self.query_tokens - 1} tokens per request" if self.query_tokens > 1 else ""

    def bucket_bytes(self) -> dict[int, int]:
        """What each bucket added to the pool, by bucket."""
        return dict(zip(self.buckets, self.added_bytes))

    def __str__(self) -> str:
        return self.summary()
