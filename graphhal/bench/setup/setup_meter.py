"""The two figures every setup reports, read around it: its wall time, and how often torch.compile compiled."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Iterator

import hal


@dataclass
class SetupMeter:
    """What ``metered_setup`` read: the wall time of the block, and the graphs Dynamo compiled in it."""

    setup_s: float = 0.0
    compiles: int = 0


@contextlib.contextmanager
def metered_setup(device: hal.Device) -> Iterator[SetupMeter]:
    """A ``SetupMeter`` filled in when the block ends, after the device has finished what the block issued."""
    meter = SetupMeter()
    compiles = dynamo_compiles()
    started = time.perf_counter()
    yield meter
    device.synchronize()
    meter.setup_s = time.perf_counter() - started
    meter.compiles = dynamo_compiles() - compiles


def dynamo_compiles() -> int:
    """Graphs Dynamo has handed a backend in this process, whatever the backend (Inductor with or without
    cudagraph trees, graphhal's piecewise backend).

    Read before and after a setup, the difference is its compile count, recompiles after a failed guard
    included: a backend's own counter sees only the backend it belongs to, and reduce-overhead has none.
    """
    from torch._dynamo.utils import counters  # imported late, as torch.compile is only used by some runs

    return counters["stats"]["unique_graphs"]
