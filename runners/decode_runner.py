"""``DecodeRunner``: one device graph per batch-size bucket for a model's decode step.

    runner = DecodeRunner(model_step, slots, device="cuda:0", config=DecodeConfig(max_bs=64))
    runner.capture()                       # logs one summary line, returns a CaptureReport
    logits = runner.run(batch)             # batch: {slot name: tensor with one row per request}

The runner never names a device: everything device-specific goes through ``hal.Device``.

Outputs of ``run`` are views into graph memory. The next ``run`` (of any bucket: all graphs share one
pool) overwrites them, so consume or copy them before the next step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

import hal
from runners.buckets import BucketPolicy
from runners.capture_report import CaptureReport
from runners.config import DecodeConfig
from runners.gc_freeze import frozen_gc
from runners.graph_outputs import GraphOutputs
from runners.input_slots import InputSlot
from runners.progress import progress
from runners.static_inputs import StaticInputs

logger = logging.getLogger(__name__)

PHASE = "decode"


@dataclass
class _CapturedBucket:
    graph: Any
    replay: Callable[[], Any]
    outputs: GraphOutputs
    addresses: dict[str, int]  # data_ptr of every tensor the graph reads by address, at capture
    addresses_checked: bool = False


class DecodeRunner:
    """Captures ``forward`` once per bucket on ``device`` and replays it for live batches.

    forward:        any callable taking the slots as keyword tensors, ``(rows, *row_shape)`` each, and
                    returning a tensor or nested dict/tuple/list of tensors with ``rows`` as first dim.
                    Rows must be independent: padded rows must not change real rows' results.
    slots:          the named inputs (``InputSlot``), with the fill padded rows get.
    device:         a device name ("cuda:0", "cpu") or a ``hal.Device``.
    config:         ``DecodeConfig`` (mode, max_bs, buckets, eager fallback, ...).
    pool:           a graph pool to share with another runner that never replays at the same time
                    (decode and prefill); default: a new pool for this runner.
    watched_tensors: tensors the forward reads that live outside the runner (KV cache, weights). Their
                    addresses are checked, like the static inputs', on each bucket's first replay: a cache
                    re-allocated or weights swapped with ``param.data = ...`` after capture would otherwise
                    be read at their old addresses.
    """

    def __init__(
        self,
        forward: Callable[..., Any],
        slots: Sequence[InputSlot],
        device: "str | hal.Device",
        config: DecodeConfig | None = None,
        *,
        pool: Any = None,
        watched_tensors: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.forward = forward
        self.config = config or DecodeConfig()
        self.device = hal.get_device(device)
        self.device.check_mode(self.config.mode)
        assert self.config.max_bs is not None and self.config.buckets is not None  # resolved by DecodeConfig
        self.buckets = BucketPolicy(self.config.buckets)
        # Role slots (cache locations, sequence lengths) take their dtype and fill from the device.
        self.slots = tuple(slot.for_device(self.device.conventions) for slot in slots)
        self.static_inputs = StaticInputs(self.slots, self.buckets.max_size, self.device.torch_device)
        # On devices that bake host values into graphs (NPU attention lengths), these slots' live values go
        # to Device.update before every replay.
        self._updated_slots = (
            [slot for slot in self.slots if slot.role == hal.SlotRole.SEQ_LENS] if self.device.needs_graph_update else []
        )
        self.pool = pool
        self.watched_tensors = dict(watched_tensors or {})
        self._graphs: dict[int, _CapturedBucket] = {}
        self.report: CaptureReport | None = None

    # --- capture ----------------------------------------------------------------------------------------

    @property
    def captures_graphs(self) -> bool:
        return self.config.mode != hal.EAGER_MODE

    @property
    def captured(self) -> bool:
        return self.report is not None

    def capture(self) -> CaptureReport:
        """Capture one graph per bucket, largest first, into one shared pool; return (and log) the report.

        A failure raises ``hal.CaptureError`` naming the bucket, mode and device, after dropping every graph
        this call made: the runner is left uncaptured and the device usable, so ``capture()`` can be retried.
        """
        if self.captured:
            raise RuntimeError("this runner has already captured its graphs; make a new runner to capture again")
        mode, device = self.config.mode, self.device
        if not self.captures_graphs:
            self.report = CaptureReport(PHASE, mode, str(device), (), 0.0, 0)
            logger.info(self.report.summary())
            return self.report
        if self.pool is None:
            self.pool = device.graph_pool()
        started = time.perf_counter()
        order = self.buckets.capture_order()
        try:
            with frozen_gc(), torch.no_grad():
                for bucket in progress(order, f"graphhal: capturing {PHASE} graphs", self.config.show_progress):
                    self._graphs[bucket] = self._capture_bucket(bucket)
        except BaseException:
            self._graphs.clear()
            raise
        pool_stats = device.memory_stats(self.pool)
        self.report = CaptureReport(
            PHASE, mode, str(device), tuple(order), time.perf_counter() - started, pool_stats.pool_bytes or 0
        )
        logger.info(self.report.summary())
        return self.report

    def _capture_bucket(self, bucket: int) -> _CapturedBucket:
        device, mode = self.device, self.config.mode
        self.static_inputs.fill_padding(bucket)
        inputs = self.static_inputs.views(bucket)
        forward = self.forward
        if mode == hal.BREAKABLE_MODE and self.config.breakable_debug:
            forward = hal.break_point(self.forward, name="the whole forward (breakable debug mode)")
        try:
            for _ in range(self.config.warmup_runs):
                self.forward(**inputs)
            device.synchronize()
        except Exception as exc:
            what = (
                f"the eager warm-up of the {PHASE} forward for bucket {bucket} on {device} failed, before any "
                "capture (a model error, not a graph error)"
            )
            raise self._capture_error(what, bucket, exc) from exc
        try:
            graph = device.make_graph(mode)
            with device.capture_session(graph, self.pool):
                outputs = forward(**inputs)
            captured_outputs = GraphOutputs(outputs, bucket)
        except Exception as exc:
            what = f"capturing the {PHASE} graph for bucket {bucket} (mode {mode}) on {device} failed"
            raise self._capture_error(what, bucket, exc) from exc
        return _CapturedBucket(graph, device.replayer(graph), captured_outputs, self._addresses())

    def _capture_error(self, what: str, bucket: int, cause: Exception) -> hal.CaptureError:
        return hal.CaptureError(
            f"{what}: {type(cause).__name__}: {cause}", bucket=bucket, mode=self.config.mode, device=str(self.device)
        )

    def _addresses(self) -> dict[str, int]:
        addresses = {f"input slot {name!r}": t.data_ptr() for name, t in self.static_inputs.buffers.items()}
        addresses.update({f"watched tensor {name!r}": t.data_ptr() for name, t in self.watched_tensors.items()})
        return addresses

    # --- run --------------------------------------------------------------------------------------------

    def can_run(self, batch: Mapping[str, torch.Tensor] | int) -> bool:
        """Whether a live batch (or a row count) runs on a captured graph rather than eagerly."""
        rows = batch if isinstance(batch, int) else self.static_inputs.check(batch)
        return self.captures_graphs and self.captured and self.buckets.fits(rows)

    def run(self, batch: Mapping[str, torch.Tensor]) -> Any:
        """Run one decode step for a live batch: replay the bucket's graph, or the forward eagerly.

        Graph outputs are views into the graph pool, valid until the next ``run`` of this runner (or of any
        runner sharing its pool). A batch over ``max_bs`` runs eagerly, or raises when eager fallback is off.
        """
        rows = self.static_inputs.check(batch)
        if not self.captures_graphs:
            return self._run_eager(batch)
        if not self.captured:
            raise RuntimeError("call capture() before run() (or use mode 'disabled' to run eagerly)")
        if not self.buckets.fits(rows):
            if not self.config.eager_fallback:
                raise ValueError(
                    f"batch of {rows} rows exceeds max_bs {self.buckets.max_size} and eager fallback is off; "
                    "split the batch or raise max_bs"
                )
            return self._run_eager(batch)
        bucket = self.buckets.bucket_for(rows)
        captured = self._graphs[bucket]
        self.static_inputs.load(batch, rows, bucket)
        if not captured.addresses_checked:
            self._check_addresses(bucket, captured)
        if self._updated_slots:
            self._update_graph(captured.graph, batch, rows, bucket)
        captured.replay()
        return captured.outputs.live_rows(rows)

    def _update_graph(self, graph: Any, batch: Mapping[str, torch.Tensor], rows: int, bucket: int) -> None:
        # A fresh host list per run: the device may apply it asynchronously, so the runner must never hand
        # over a buffer it will mutate for the next step while this one may still be read.
        params = {}
        for slot in self._updated_slots:
            values = batch[slot.name].tolist()
            params[slot.role] = values + [slot.fill] * (bucket - rows)
        self.device.update(graph, params)

    def _run_eager(self, batch: Mapping[str, torch.Tensor]) -> Any:
        with torch.no_grad():
            return self.forward(**batch)

    def _check_addresses(self, bucket: int, captured: _CapturedBucket) -> None:
        moved = [name for name, address in self._addresses().items() if captured.addresses.get(name) != address]
        if moved:
            raise hal.StaticAddressError(
                f"{', '.join(moved)} moved since the {PHASE} graph for bucket {bucket} was captured; the graph "
                "would read the old memory. Keep these tensors in place (copy_ into them) or capture again."
            )
        captured.addresses_checked = True
