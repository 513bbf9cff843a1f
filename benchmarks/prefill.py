"""The prefill contenders: eager, and ``PrefillRunner`` in modes ``piecewise`` and ``breakable``.

Prefill is benchmarked per ``PrefillShape`` (total new tokens, split over requests), with one runner per
shape whose only token bucket is the shape's token count and whose ``max_requests`` is its request count, so
nothing is padded. The hand-written floor and torch.compile's peer are decode-only: prefill attention over
packed requests changes with how the tokens split into requests, so no plain full graph serves it -- which
is why graphhal runs prefill piecewise or breakable (``PrefillConfig`` refuses ``full``).
"""

from __future__ import annotations

import time

import hal
from benchmarks.contenders import Prepared
from benchmarks.names import EAGER
from benchmarks.workload import BenchModel, PrefillShape
from refmodel import PrefillWorkload
from runners import PrefillConfig, PrefillRunner

PREFILL_MODES = ("piecewise", "breakable")


class PrefillCase:
    """One prefill shape's requests in the KV cache, with the forward and its batch; ``release`` frees blocks."""

    def __init__(self, bench: BenchModel, shape: PrefillShape, seed: int = 0) -> None:
        self.shape = shape
        self.workload = PrefillWorkload(bench.kv_cache, shape.query_lens(), seed=seed)
        self.forward = bench.model.prefill_forward(bench.kv_cache)
        self.batch = self.workload.batch()

    def release(self) -> None:
        self.workload.release()


def prefill_skip_reason(mode: str, device: hal.Device) -> str | None:
    if mode != EAGER and mode not in device.modes:
        return f"device {device} does not offer mode {mode!r} (its modes: {', '.join(device.modes)})"
    return None


def eager_prefill(case: PrefillCase) -> Prepared:
    forward, batch = case.forward, case.batch
    return Prepared(run=lambda: forward(**batch))


def runner_prefill(case: PrefillCase, mode: str, device: hal.Device) -> Prepared:
    shape = case.shape
    config = PrefillConfig(mode=mode, buckets=[shape.tokens], max_requests=shape.requests, show_progress=False)
    started = time.perf_counter()
    runner = PrefillRunner(case.forward, case.workload.token_slots(), case.workload.request_slots(), device, config)
    report = runner.capture()
    device.synchronize()
    batch = case.batch
    return Prepared(run=lambda: runner.run(batch), setup_s=time.perf_counter() - started, pool_bytes=report.pool_bytes)
