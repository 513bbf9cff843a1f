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
    pool_bytes: int

    def summary(self) -> str:
        if not self.buckets:
            return f"graphhal: {self.phase} runs eagerly on {self.device} (mode {self.mode}); nothing captured"
        sizes = f"{self.buckets[0]}" if len(self.buckets) == 1 else f"{self.buckets[0]}..{self.buckets[-1]}"
        return (
            f"graphhal: captured {len(self.buckets)} {self.phase} graphs ({self.mode}, {self.device}) "
            f"for sizes {sizes} in {self.seconds:.2f} s, pool {self.pool_bytes / MIB:.1f} MiB"
        )

    def __str__(self) -> str:
        return self.summary()
