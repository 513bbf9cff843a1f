"""Capture-only measurements: startup cost of a server's decode graphs, pool sharing, and one break's price.

- Capture time of every default decode bucket up to ``max_bs`` (mode ``full``, one runner, one pool) --
  what a server pays at startup.
- Pool memory of all those buckets over the largest bucket captured alone: graphhal captures the largest
  first into one shared pool so the smaller ones reuse its memory; the ratio says how well that works on this
  device (about 1 on CUDA; the cpu reference device keeps every graph's tensors, so it grows there).
- One break: (breakable - full) step time at batch 1, divided by the number of break points in one step.
"""

from __future__ import annotations

import time

from benchmarks.contenders.static_buffers import static_copy
from benchmarks.memory import release_memory
from benchmarks.results import CaptureCost
from benchmarks.workload import Workload
from runners import DecodeConfig, DecodeRunner


def capture_all_buckets(workload: Workload, max_bs: int, show_progress: bool) -> CaptureCost:
    """Capture every default bucket up to ``max_bs``, then the largest alone, and compare their pools.

    A one-bucket runner is captured first and kept alive through both: cuBLAS allocates its workspace for
    the capture stream during the first capture on it, from that capture's pool, and it must stay there
    (graphs captured later on the stream use it too). Charged to neither side, it would otherwise make
    whichever runner comes first look 32 MiB (on an H100) larger.
    """
    device = workload.device
    first_capture = DecodeRunner(
        workload.decode_step, workload.decode_slots, device, DecodeConfig(mode="full", buckets=[1], show_progress=False)
    )
    first_capture.capture()
    started = time.perf_counter()
    runner = DecodeRunner(
        workload.decode_step, workload.decode_slots, device, DecodeConfig(mode="full", max_bs=max_bs, show_progress=show_progress)
    )
    report = runner.capture()
    device.synchronize()
    capture_s = time.perf_counter() - started
    num_buckets, pool_all = len(report.buckets), report.pool_bytes
    del runner, report
    release_memory(device)

    largest = DecodeRunner(
        workload.decode_step, workload.decode_slots, device, DecodeConfig(mode="full", buckets=[max_bs], show_progress=False)
    )
    pool_largest = largest.capture().pool_bytes
    del largest, first_capture
    release_memory(device)
    return CaptureCost(
        max_bs=max_bs, num_buckets=num_buckets, capture_s=capture_s, pool_bytes_all=pool_all, pool_bytes_largest=pool_largest
    )


def count_breaks(workload: Workload) -> int:
    """Break points one decode step passes, counted on a breakable graph captured at batch 1.

    Counted rather than assumed (one per layer today) so that a model change cannot silently skew the
    per-break cost.
    """
    device = workload.device
    static = static_copy(workload.decode_batch(1))
    workload.decode_step(**static)  # warm-up: nothing lazy may happen inside the capture
    device.synchronize()
    graph = device.make_graph("breakable")
    with device.capture_session(graph, device.graph_pool()):
        workload.decode_step(**static)
    device.synchronize()
    breaks = graph.num_breaks
    del graph
    release_memory(device)
    return breaks

