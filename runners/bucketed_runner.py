"""``BucketedRunner``: what DecodeRunner and PrefillRunner share: buckets, static inputs, capture, replay.

A runner captures ``forward`` once per bucket, largest first, into one pool, and replays it for live
batches padded to the bucket. Its inputs are bucketed slots (one row per request in decode, per token in
prefill) and, optionally, fixed slots padded to a fixed row count every run (per-request prefill inputs).
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
from runners.bucket_capture import CapturedBucket, bucket_capture
from runners.buckets import BucketPolicy
from runners.capture_report import CaptureReport
from runners.config import PhaseConfig
from runners.gc_freeze import frozen_gc
from runners.graph_outputs import GraphOutputs
from runners.input_slots import InputSlot
from runners.progress import progress
from runners.static_inputs import StaticInputs

logger = logging.getLogger(__name__)


@dataclass
class _Bucket:
    captured: CapturedBucket
    outputs: GraphOutputs  # the outputs as captured
    addresses: dict[str, int]  # data_ptr of every tensor the graph reads by address, at capture
    # Whether every replay hands back the captured output tensors. True for one device graph; a piecewise
    # forward returns what its last piece returns, checked on the first replay.
    outputs_static: bool
    addresses_checked: bool = False

    @property
    def graph(self) -> Any:
        return self.captured.graph


class BucketedRunner:
    """See ``DecodeRunner`` and ``PrefillRunner`` for the arguments; this class holds the shared mechanics."""

    phase = ""

    def __init__(
        self,
        forward: Callable[..., Any],
        slots: Sequence[InputSlot],
        device: "str | hal.Device",
        config: PhaseConfig,
        *,
        fixed_slots: Sequence[InputSlot] = (),
        fixed_rows: int = 0,
        pool: Any = None,
        watched_tensors: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.forward = forward
        self.config = config
        self.device = hal.get_device(device)
        config.check_device(self.device)
        assert config.buckets is not None  # resolved by the config
        self.buckets = BucketPolicy(config.buckets)
        # Role slots (cache locations, sequence lengths) take their dtype and fill from the device.
        conventions = self.device.conventions
        self.slots = tuple(slot.for_device(conventions) for slot in slots)
        self.fixed_slots = tuple(slot.for_device(conventions) for slot in fixed_slots)
        self.static_inputs = StaticInputs(self.slots, self.buckets.max_size, self.device.torch_device)
        self.fixed_inputs = (
            StaticInputs(self.fixed_slots, fixed_rows, self.device.torch_device) if self.fixed_slots else None
        )
        self.pool = pool
        self.watched_tensors = dict(watched_tensors or {})
        self._capture = bucket_capture(forward, self.device, config, [slot.name for slot in self.slots])
        self._graphs: dict[int, _Bucket] = {}
        self.report: CaptureReport | None = None
        # On devices that bake host values into graphs (NPU attention lengths), these slots' live values go
        # to Device.update before every replay of a graph that holds them.
        self._updated_slots = (
            [s for s in (*self.slots, *self.fixed_slots) if s.role == hal.SlotRole.SEQ_LENS]
            if self.device.needs_graph_update
            else []
        )

    # --- capture ----------------------------------------------------------------------------------------

    @property
    def captures_graphs(self) -> bool:
        return self.config.mode != hal.EAGER_MODE

    @property
    def captured(self) -> bool:
        return self.report is not None

    def capture(self) -> CaptureReport:
        """Capture every bucket, largest first, into one shared pool; return (and log) the report.

        A failure raises ``hal.CaptureError`` naming the bucket, mode and device, after dropping every graph
        this call made: the runner is left uncaptured and the device usable, so ``capture()`` can be retried.
        """
        if self.captured:
            raise RuntimeError("this runner has already captured its graphs; make a new runner to capture again")
        mode, device, phase = self.config.mode, self.device, self.phase
        if not self.captures_graphs:
            self.report = CaptureReport(phase, mode, str(device), (), 0.0, 0)
            logger.info(self.report.summary())
            return self.report
        owns_pool = self.pool is None
        if owns_pool:
            self.pool = device.graph_pool()
        started = time.perf_counter()
        order = self.buckets.capture_order()
        try:
            self._capture.prepare(self.pool)
            with frozen_gc(), torch.no_grad():
                for bucket in progress(order, f"graphhal: capturing {phase} graphs", self.config.show_progress):
                    self._graphs[bucket] = self._capture_bucket(bucket)
        except BaseException:
            self._graphs.clear()
            self._capture.drop()
            if owns_pool:
                # With its last graph gone a device may release a private pool (CUDA does): a retry must
                # start from a new one rather than capture into the released handle.
                self.pool = None
            raise
        pool_stats = device.memory_stats(self.pool)
        self.report = CaptureReport(
            phase, mode, str(device), tuple(order), time.perf_counter() - started, pool_stats.pool_bytes or 0
        )
        logger.info(self.report.summary())
        return self.report

    def _capture_bucket(self, bucket: int) -> _Bucket:
        self.static_inputs.fill_padding(bucket)
        if self.fixed_inputs is not None:
            self.fixed_inputs.fill_padding(self.fixed_inputs.capacity)
        inputs = self._views(bucket)
        try:
            self._capture.warm_up(inputs)
        except Exception as exc:
            what = (
                f"the eager warm-up of the {self.phase} forward for bucket {bucket} on {self.device} failed, before "
                "any capture (a model error, not a graph error)"
            )
            raise self._capture_error(what, bucket, exc) from exc
        try:
            captured = self._capture.capture(bucket, inputs)
            outputs = GraphOutputs(captured.outputs, bucket)
        except Exception as exc:
            what = f"capturing the {self.phase} graph for bucket {bucket} (mode {self.config.mode}) on {self.device} failed"
            raise self._capture_error(what, bucket, exc) from exc
        return _Bucket(captured, outputs, self._addresses(), outputs_static=captured.graph is not None)

    def _views(self, bucket: int) -> dict[str, torch.Tensor]:
        views = self.static_inputs.views(bucket)
        if self.fixed_inputs is not None:
            views.update(self.fixed_inputs.views(self.fixed_inputs.capacity))
        return views

    def _capture_error(self, what: str, bucket: int, cause: Exception) -> hal.CaptureError:
        return hal.CaptureError(
            f"{what}: {type(cause).__name__}: {cause}", bucket=bucket, mode=self.config.mode, device=str(self.device)
        )

    def _addresses(self) -> dict[str, int]:
        addresses = {f"input slot {name!r}": t.data_ptr() for name, t in self.static_inputs.buffers.items()}
        if self.fixed_inputs is not None:
            addresses.update({f"input slot {name!r}": t.data_ptr() for name, t in self.fixed_inputs.buffers.items()})
        addresses.update({f"watched tensor {name!r}": t.data_ptr() for name, t in self.watched_tensors.items()})
        return addresses

    # --- run --------------------------------------------------------------------------------------------

    def _check(self, batch: Mapping[str, torch.Tensor]) -> tuple[int, int]:
        """Validate a live batch; return its bucketed rows and fixed rows (0 without fixed slots)."""
        if self.fixed_inputs is None:
            return self.static_inputs.check(batch), 0
        names = set(batch)
        fixed_names = {slot.name for slot in self.fixed_slots}
        row_names = {slot.name for slot in self.slots}
        unexpected = sorted(names - fixed_names - row_names)
        missing = sorted((fixed_names | row_names) - names)
        if unexpected or missing:
            raise ValueError(
                "batch does not match the runner's input slots"
                + (f"; missing: {', '.join(missing)}" if missing else "")
                + (f"; unexpected: {', '.join(unexpected)}" if unexpected else "")
                + f"; expected exactly: {', '.join(sorted(fixed_names | row_names))}"
            )
        rows = self.static_inputs.check({name: batch[name] for name in row_names})
        fixed_rows = self.fixed_inputs.check({name: batch[name] for name in fixed_names})
        return rows, fixed_rows

    def _fits(self, rows: int, fixed_rows: int) -> bool:
        fixed_fits = self.fixed_inputs is None or fixed_rows <= self.fixed_inputs.capacity
        return self.buckets.fits(rows) and fixed_fits

    def can_run(self, batch: Mapping[str, torch.Tensor] | int) -> bool:
        """Whether a live batch (or a row count) runs on captured graphs rather than eagerly."""
        rows, fixed_rows = (batch, 0) if isinstance(batch, int) else self._check(batch)
        return self.captures_graphs and self.captured and self._fits(rows, fixed_rows)

    def run(self, batch: Mapping[str, torch.Tensor]) -> Any:
        """Run the forward for a live batch: replay its bucket's graphs, or run eagerly.

        Graph outputs are views into the graph pool, valid until the next ``run`` of this runner (or of any
        runner sharing its pool). A batch over the phase maximum runs eagerly, or raises when eager fallback
        is off.
        """
        rows, fixed_rows = self._check(batch)
        if not self.captures_graphs:
            return self._run_eager(batch)
        if not self.captured:
            raise RuntimeError("call capture() before run() (or use mode 'disabled' to run eagerly)")
        if not self._fits(rows, fixed_rows):
            if not self.config.eager_fallback:
                raise ValueError(f"{self._describe_misfit(rows, fixed_rows)} and eager fallback is off; split the batch")
            return self._run_eager(batch)
        bucket = self.buckets.bucket_for(rows)
        captured = self._graphs[bucket]
        self.static_inputs.load(batch, rows, bucket)
        if self.fixed_inputs is not None:
            self.fixed_inputs.load(batch, fixed_rows, self.fixed_inputs.capacity)
        if not captured.addresses_checked:
            self._check_addresses(bucket, captured)
        if self._updated_slots and captured.graph is not None:
            self._update_graph(captured.graph, batch, rows, bucket, fixed_rows)
        outputs = captured.captured.run()
        if captured.outputs_static:  # a graph: it wrote into the outputs captured
            return captured.outputs.live_rows(rows)
        replayed = GraphOutputs(outputs, bucket)
        captured.outputs_static = replayed.same_tensors(captured.outputs)
        return replayed.live_rows(rows)

    def _describe_misfit(self, rows: int, fixed_rows: int) -> str:
        if not self.buckets.fits(rows):
            return f"batch of {rows} rows exceeds {self.config.size_field} {self.buckets.max_size}"
        assert self.fixed_inputs is not None
        return f"batch has {fixed_rows} rows of per-request inputs, more than the {self.fixed_inputs.capacity} the runner holds"

    def _update_graph(self, graph: Any, batch: Mapping[str, torch.Tensor], rows: int, bucket: int, fixed_rows: int) -> None:
        # A fresh host list per run: the device may apply it asynchronously, so the runner must never hand
        # over a buffer it will mutate for the next step while this one may still be read.
        params = {}
        for slot in self._updated_slots:
            is_fixed = self.fixed_inputs is not None and slot in self.fixed_slots
            live, padded = (fixed_rows, self.fixed_inputs.capacity) if is_fixed else (rows, bucket)  # type: ignore[union-attr]
            params[slot.role] = batch[slot.name].tolist() + [slot.fill] * (padded - live)
        self.device.update(graph, params)

    def _run_eager(self, batch: Mapping[str, torch.Tensor]) -> Any:
        with torch.no_grad():
            return self.forward(**batch)

    def _check_addresses(self, bucket: int, captured: _Bucket) -> None:
        moved = [name for name, address in self._addresses().items() if captured.addresses.get(name) != address]
        if moved:
            raise hal.StaticAddressError(
                f"{', '.join(moved)} moved since the {self.phase} graph for bucket {bucket} was captured; the graph "
                "would read the old memory. Keep these tensors in place (copy_ into them) or capture again."
            )
        captured.addresses_checked = True
