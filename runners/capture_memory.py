"""What a capture under way has taken from its pool, bucket by bucket, and the budget it is held to."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import hal
from runners.config import PhaseConfig


class PoolBudgetError(hal.GraphHalError, ValueError):
    """Capturing every bucket would take more graph pool memory than the config's ``pool_budget_mib``."""


@dataclass
class CaptureMemory:
    """A capture under way: begun by ``estimate_pool_bytes`` (or ``capture``), finished by ``capture``.

    started:        when it began (``time.perf_counter``), for the report.
    order:          every bucket, largest first; empty when nothing is captured (mode disabled).
    before:         pool bytes before this runner captured (a shared pool holds another runner's graphs).
    inference_mode: the inference mode the capture began in: every bucket is captured in it.
    added:          pool bytes each captured bucket added, in capture order.
    device_added:   device-wide bytes each bucket took (free memory before its warm-up and capture, less after:
                    graph objects, executable graphs and communicators' buffers included), in capture order;
                    None entries where the device does not report free memory.
    seconds:        how long each bucket's warm-up and capture took, in capture order.
    """

    started: float
    order: list[int]
    before: int
    inference_mode: bool = False
    added: list[int] = field(default_factory=list)
    device_added: list[int | None] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    @property
    def pool_bytes(self) -> int:
        """The pool as last read: before this runner, plus what its buckets added so far."""
        return self.before + sum(self.added)

    @property
    def estimate(self) -> int:
        """What the largest bucket took: what all of them will take (every smaller bucket reuses its memory)."""
        return self.added[0] if self.added else 0

    def record(self, pool_bytes: int, used_before: int | None, used_after: int | None, began: float) -> None:
        """One bucket captured: the pool as read now, device-wide use before and after it, when it began."""
        self.seconds.append(time.perf_counter() - began)
        self.added.append(pool_bytes - self.pool_bytes)
        self.device_added.append(None if used_before is None or used_after is None else used_after - used_before)

    @property
    def device_bytes(self) -> int | None:
        """Device-wide bytes every bucket captured so far took (None where the device cannot tell)."""
        if not self.device_added or any(b is None for b in self.device_added):
            return None
        return sum(b for b in self.device_added if b is not None)

    def over_budget(self, config: PhaseConfig, phase: str, buckets: int) -> PoolBudgetError | None:
        """The error to raise when the estimate is over ``config.pool_budget_mib`` (None when within it)."""
        budget = config.pool_budget_mib
        if budget is None or self.estimate <= budget * hal.MIB:
            return None
        largest = self.order[0]
        return PoolBudgetError(
            f"{phase}: the graph pool for {buckets} buckets up to {largest} would take about "
            f"{self.estimate / hal.MIB:.1f} MiB (bucket {largest} captured alone, which every smaller bucket reuses), "
            f"over pool_budget_mib {budget:g}. Capture up to a smaller {config.size_field} (the pool grows with the "
            "largest bucket), or raise the budget; fewer buckets save little, since they share the largest's "
            "memory. Nothing else was captured."
        )


def device_used(device: "hal.Device") -> int | None:
    """Device-wide memory in use (``hal.MemoryStats.device_used_bytes``) once the device's queued work is done."""
    device.synchronize()
    return device.memory_stats().device_used_bytes
