"""Capture-only measurements: startup cost of a server's decode graphs, pool sharing, and one break's price.

- Capture time of every default decode bucket up to ``max_bs`` (mode ``full``, one runner, one pool) --
  what a server pays at startup.
- Pool memory of all those buckets over the largest bucket captured alone: graphhal captures the largest
  first into one shared pool so the smaller ones reuse its memory; the ratio says how well that works on this
  device (about 1 on CUDA; the cpu reference device keeps every graph's tensors, so it grows there).
- One break: (breakable - full) step time at batch 1, divided by the number of break points in one step.

``measure_capture_cost`` runs them in that order, each apart in memory (``Measurements.attempt``).
"""

from __future__ import annotations

import time
from functools import partial

import hal
from graphhal.bench.contenders import DECODE_CONTENDERS
from graphhal.bench.contenders.static_buffers import static_copy
from graphhal.bench.measurements import Measurements, release_memory
from graphhal.bench.names import DECODE
from graphhal.bench.results import CaptureCost, Failed, PoolShare
from graphhal.bench.setup.pool_share import measure_pool_share
from graphhal.bench.workload import Workload
from runners import DecodeConfig, DecodeRunner


def measure_capture_cost(
    workload: Workload, max_bs: int, measurements: Measurements, show_progress: bool
) -> CaptureCost | None:
    """Every bucket's capture and pool, then one break's price where the device has breakable graphs."""
    device = workload.device
    measurements.describe("capture cost")
    every_bucket = partial(capture_all_buckets, workload, max_bs, show_progress)
    cost = measurements.attempt(DECODE, "capture cost", f"buckets up to {max_bs}", every_bucket)
    if isinstance(cost, Failed):
        return None
    for mode in (hal.GraphMode.FULL, hal.GraphMode.BREAKABLE, hal.GraphMode.PIECEWISE):
        if mode not in device.modes:
            continue
        share = measurements.attempt(DECODE, f"pool sharing {mode}", f"buckets up to {max_bs}", partial(decode_pool_share, workload, mode.value, max_bs))
        if not isinstance(share, Failed):
            cost.pools.append(share)
    if hal.GraphMode.BREAKABLE not in device.modes:
        cost.note = f"no one-break cost: device {device} has no breakable mode"
        return cost
    breaks = measurements.attempt(DECODE, "break count", "1", partial(count_breaks, workload))
    if isinstance(breaks, Failed):
        return cost
    cost.breaks = breaks
    (cost.full_bs1_ms, cost.full_bs1_rel_error), (cost.breakable_bs1_ms, cost.breakable_bs1_rel_error) = _bs1_ms(
        workload, measurements, hal.GraphMode.FULL.value, hal.GraphMode.BREAKABLE.value
    )
    return cost


def capture_all_buckets(workload: Workload, max_bs: int, show_progress: bool) -> CaptureCost:
    """Capture every default bucket up to ``max_bs``, then the largest alone, and compare their pools.

    A one-bucket runner is captured first and kept alive through both: cuBLAS allocates its workspace for
    the capture stream during the first capture on it, from that capture's pool, and it must stay there
    (graphs captured later on the stream use it too). Charged to neither side, it would otherwise make
    whichever runner comes first look 32 MiB (on an H100) larger.
    """
    device = workload.device
    first_capture = DecodeRunner(
        workload.decode_step, workload.decode_slots, device, DecodeConfig(mode=hal.GraphMode.FULL, buckets=[1], show_progress=False),
        group=workload.group,
    )
    first_capture.capture()
    started = time.perf_counter()
    runner = DecodeRunner(
        workload.decode_step, workload.decode_slots, device, DecodeConfig(mode=hal.GraphMode.FULL, max_bs=max_bs, show_progress=show_progress),
        group=workload.group,
    )
    report = runner.capture()
    device.synchronize()
    capture_s = time.perf_counter() - started
    num_buckets, pool_all = len(report.buckets), report.pool_bytes
    del runner, report
    release_memory(device)  # the largest bucket alone gets none of the memory all buckets were captured in

    largest = DecodeRunner(
        workload.decode_step, workload.decode_slots, device, DecodeConfig(mode=hal.GraphMode.FULL, buckets=[max_bs], show_progress=False),
        group=workload.group,
    )
    pool_largest = largest.capture().pool_bytes
    return CaptureCost(
        max_bs=max_bs, num_buckets=num_buckets, capture_s=capture_s, pool_bytes_all=pool_all, pool_bytes_largest=pool_largest
    )


def decode_pool_share(workload: Workload, mode: str, max_bs: int) -> PoolShare:
    """Every default decode bucket up to ``max_bs`` in ``mode`` against bucket ``max_bs`` alone, and the estimate."""
    buckets = DecodeConfig(max_bs=max_bs).buckets
    assert buckets is not None

    def runner(sizes: list[int]) -> DecodeRunner:
        config = DecodeConfig(mode=mode, buckets=sizes, show_progress=False)
        return DecodeRunner(workload.decode_step, workload.decode_slots, workload.device, config, group=workload.group)

    return measure_pool_share("decode", mode, runner, buckets, workload.device)


def count_breaks(workload: Workload) -> int:
    """Break points one decode step passes, counted on a breakable graph captured at batch 1.

    Counted rather than assumed (one per layer today) so that a model change cannot silently skew the
    per-break cost.
    """
    device = workload.device
    static = static_copy(workload.decode_batch(1))
    workload.decode_step(**static)  # warm-up: nothing lazy may happen inside the capture
    device.synchronize()
    graph = device.make_graph(hal.GraphMode.BREAKABLE)
    with device.capture_session(graph, device.graph_pool()):
        workload.decode_step(**static)
    device.synchronize()
    return graph.num_breaks


def _bs1_ms(workload: Workload, measurements: Measurements, *modes: str) -> list[tuple[float | None, float | None]]:
    """Step times of ``modes`` at batch 1 with the relative standard error of each: from the table when all were
    measured, else measured now, together."""
    rows = {row.mode: row for row in measurements.result.rows if row.phase == DECODE and row.batch_size == 1}
    if not all(mode in rows for mode in modes):
        batch = workload.decode_batch(1)
        contenders = [(mode, partial(DECODE_CONTENDERS[mode](workload.device).prepare, workload, batch)) for mode in modes]
        rows = {row.mode: row for row in measurements.size(DECODE, {"batch_size": 1}, contenders, record=False)}
    return [(rows[mode].median_ms, rows[mode].rel_error) if mode in rows else (None, None) for mode in modes]

