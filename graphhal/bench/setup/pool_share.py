"""How well a runner's buckets share its graph pool: every bucket against the largest alone, and the estimate.

A server sizes its KV cache with the graph pool set aside, so what matters is the pool of all buckets, known
before they are captured. graphhal captures the largest bucket first and every smaller one reuses its memory;
``measure_pool_share`` captures the largest bucket alone, then every bucket (asking the runner's estimate,
made after its largest bucket, before the others), and reports both pools and the estimate.
"""

from __future__ import annotations

from typing import Any, Callable

from graphhal.bench.measurements import release_memory
from graphhal.bench.results import PoolShare

MakeRunner = Callable[[list[int]], Any]  # buckets -> an uncaptured DecodeRunner or PrefillRunner


def measure_pool_share(phase: str, mode: str, make_runner: MakeRunner, buckets: list[int], device: Any) -> PoolShare:
    # A one-bucket runner captured first and kept alive through both: cuBLAS allocates its workspace for the
    # capture stream during the first capture on it, from that capture's pool, and it must stay there (later
    # graphs use it too). Charged to neither side, it would make whichever comes first look larger.
    first = make_runner([buckets[0]])
    first.capture()
    largest = buckets[-1]
    alone = make_runner([largest])
    pool_largest = alone.capture().pool_bytes
    alone.close()
    del alone
    release_memory(device)  # all buckets get none of the memory the largest alone was captured in
    runner = make_runner(buckets)
    estimate = runner.estimate_pool_bytes()
    report = runner.capture()
    share = PoolShare(phase, mode, len(buckets), largest, report.pool_bytes, pool_largest, estimate)
    runner.close()
    first.close()
    return share
