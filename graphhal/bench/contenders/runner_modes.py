"""graphhal itself: a ``DecodeRunner`` or ``PrefillRunner`` in one mode, with one bucket, the size timed.

One bucket of exactly the size timed means no padding, so the comparison with the floor is like for like.

- decode ``full`` / ``breakable`` / ``piecewise``: ``DecodeRunner`` in that mode, where the device offers it.
- decode ``full+inductor``: ``DecodeConfig(compiler="inductor")``: the forward compiled once by torch.compile
  with a dynamic batch dim and no Inductor cudagraphs, then captured by graphhal. Only on devices whose graphs
  capture compiled kernels (CUDA; the cpu device's graphs record torch ops).
- prefill ``piecewise`` / ``breakable``: ``PrefillRunner`` whose only token bucket is the case's token count
  and whose ``max_requests`` is its request count. Prefill attention over packed requests changes with how
  the tokens split into requests, so no plain full graph serves it (``PrefillConfig`` refuses ``full``).
"""

from __future__ import annotations

import time

import hal
from graphhal.bench.contenders.contender import Batch, Contender, Prepared, missing_mode
from graphhal.bench.workload import PrefillCase, Workload
from runners import DecodeConfig, DecodeRunner, PrefillConfig, PrefillRunner


class DecodeRunnerMode(Contender[Batch]):
    """graphhal's ``DecodeRunner`` in one mode, optionally with a compiler, one bucket per batch size."""

    def __init__(self, mode: str, compiler: str | None = None, check_addresses: str = "every_replay") -> None:
        self.mode = mode
        self.compiler = compiler
        self.check_addresses = check_addresses
        self.name = mode if compiler is None else f"{mode}+{compiler}"
        self.detail = f"DecodeRunner(mode={mode!r}" + (f", compiler={compiler!r}" if compiler else "")
        if check_addresses != "every_replay":
            self.name += f" ({check_addresses.replace('_', '-')} check)"
            self.detail += f", check_addresses={check_addresses!r}"
        self.detail += "), weights and KV cache watched"

    def skip_reason(self, device: hal.Device) -> str | None:
        missing = missing_mode(device, self.mode)
        if missing is not None:
            return missing
        try:  # the config knows which devices can capture compiled kernels; ask it rather than guess
            DecodeConfig(mode=self.mode, compiler=self.compiler, max_bs=1).check_device(device)
        except (ValueError, hal.GraphHalError) as exc:
            return str(exc)
        return None

    def prepare(self, workload: Workload, batch: Batch) -> Prepared:
        rows = next(iter(batch.values())).shape[0]
        config = DecodeConfig(
            mode=self.mode, buckets=[rows], compiler=self.compiler, show_progress=False, check_addresses=self.check_addresses
        )
        started = time.perf_counter()
        runner = DecodeRunner(
            workload.decode_step, workload.decode_slots, workload.device, config,
            watched_tensors=workload.watched(), group=workload.group,
        )
        report = runner.capture()
        workload.device.synchronize()
        return Prepared(run=lambda: runner.run(batch), setup_s=time.perf_counter() - started, pool_bytes=report.pool_bytes)


class PrefillRunnerMode(Contender[PrefillCase]):
    """graphhal's ``PrefillRunner`` in one mode, one token bucket and as many requests as the case has."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.name = mode

    def skip_reason(self, device: hal.Device) -> str | None:
        return missing_mode(device, self.mode)

    def prepare(self, workload: Workload, case: PrefillCase) -> Prepared:
        shape, device = case.shape, workload.device
        config = PrefillConfig(mode=self.mode, buckets=[shape.tokens], max_requests=shape.requests, show_progress=False)
        started = time.perf_counter()
        runner = PrefillRunner(case.forward, *workload.prefill_slots(), device, config, group=workload.group)
        report = runner.capture()
        device.synchronize()
        batch = case.batch
        return Prepared(run=lambda: runner.run(batch), setup_s=time.perf_counter() - started, pool_bytes=report.pool_bytes)
