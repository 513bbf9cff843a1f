"""What a capture under way has taken from its pool, bucket by bucket, and the budget it is held to."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

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
                    graph objects, executable graphs and communicators' buffers included), less what the
                    allocator newly keeps cached outside the pool, unused (see ``DeviceUse``), in capture order;
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

    def record(self, pool_bytes: int, before: "DeviceUse", after: "DeviceUse", began: float) -> None:
        """One bucket captured: the pool as read now, the device's use before and after it, when it began."""
        self.seconds.append(time.perf_counter() - began)
        self.added.append(pool_bytes - self.pool_bytes)
        self.device_added.append(after.taken_since(before))

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


@dataclass(frozen=True)
class DeviceUse:
    """The device's memory once its queued work is done: in use device-wide (None where it cannot tell), what
    its allocator holds (reserved) and of that holds cached but unused (reserved less allocated; 0 for a device
    without a cache), and the graph pool's bytes (None where the device cannot tell a pool's share)."""

    used: int | None
    cached_unused: int
    pool: int | None
    reserved: int

    def taken_since(self, before: "DeviceUse") -> int | None:
        """Device-wide bytes taken since ``before`` that a capture keeps: all of it, less the growth of memory
        the allocator keeps cached but unused outside the pool.

        The warm-up's activations are freed to the allocator's cache after it; whether they take new memory
        from the device depends on what the cache held before, not on the graphs (on an H100, a real KV cache
        of exact-size segments left none of the slack a small stand-in cache's segments had, and a prefill
        capture's device-wide figure grew by 10 MiB against the plan's, all of it cached and unused), and the
        cache serves the next eager step. The pool's growth is taken as kept whole, so what is left out is at
        most the idle growth outside it (never the graphs' own memory), and never more than the allocator newly
        took from the device outside the pool: memory that was already reserved and only became idle (a cuBLAS
        workspace the capture dropped, on an H100 32 MiB) took nothing from the device and comes off nothing.
        One case still errs low: a capture that both reserves new memory for tensors it keeps outside its pool
        and drops such an idle block reads the new memory as idle (telling them apart needs the allocator's
        segments before and after). Memory outside the allocator and tensors a graph keeps alive outside its
        pool stay counted. A device that cannot tell the pool's share gets no correction: without it, the
        pool's freed intermediates would look idle too.
        """
        if self.used is None or before.used is None:
            return None
        taken = self.used - before.used
        if self.pool is None or before.pool is None:
            return taken
        pool_growth = self.pool - before.pool
        idle_growth = self.cached_unused - before.cached_unused - pool_growth
        reserved_growth = self.reserved - before.reserved - pool_growth
        return taken - max(0, min(idle_growth, reserved_growth))


def device_use(device: "hal.Device", pool: Any = None) -> DeviceUse:
    """The device's memory (``DeviceUse``) once its queued work is done, with ``pool``'s share where told."""
    device.synchronize()
    stats = device.memory_stats(pool)
    return DeviceUse(
        stats.device_used_bytes, max(0, stats.reserved_bytes - stats.allocated_bytes), stats.pool_bytes, stats.reserved_bytes,
    )
