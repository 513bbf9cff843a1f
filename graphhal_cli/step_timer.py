"""Wall-clock time per step of a callable on any device, the device queue drained around each timing."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import hal


def time_per_step(step: Callable[[], Any], device: hal.Device, *, steps: int, repeats: int, warmup: int = 3) -> float:
    """Median over ``repeats`` of the mean seconds per step over ``steps`` back-to-back calls.

    Steps are issued back to back and the device synchronised only at the ends, as a server issues them:
    on devices that queue work this measures throughput of launches plus kernels, not one step's latency
    with a host round trip added.
    """
    for _ in range(warmup):
        step()
    device.synchronize()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(steps):
            step()
        device.synchronize()
        samples.append((time.perf_counter() - started) / steps)
    return statistics.median(samples)
