"""A runner's capture: the mode settled first, then every bucket captured, largest first, into one pool.

The order is the anchors' (DESIGN.md): agree across ranks on what to capture; settle the mode (``auto`` and
``full`` run the forward once eagerly at the largest bucket to see what its ops allow,
``runners.mode_choice``), so the capture strategy for that mode is built once; make or join the pool; capture
the largest bucket and measure it (the estimate, checked against the budget before anything else is
captured); then every smaller bucket into the memory it left. The garbage collector stays frozen throughout,
and every rank of a group meets after each warm-up and each capture. A failure drops every graph this loop
made and leaves the runner as it was before ``capture()``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from typing import Any, Callable

import torch

import hal
from hal.graph_per_key import WarmUpError
from runners.address_watch import AddressWatch
from runners.bucket_capture import BucketCapture, CapturedStep, breakable_debug, bucket_capture
from runners.buckets import BucketPolicy
from runners.capture_memory import CaptureMemory, DeviceUse, device_use
from runners.capture_report import CaptureReport
from runners.compile_cache import CompileCache
from runners.config import PhaseConfig
from runners.gc_freeze import frozen_gc
from runners.graph_budget import GraphBudgetError, fit_to_budget
from runners.graph_outputs import GraphOutputs
from runners.mode_choice import choose_mode
from runners.progress import progress
from runners.rank_group import RankCaptureError, RankGroup, SoloRank
from runners.step_inputs import StepInputs
from runners.thread_owner import ThreadOwner, owner_of_pool

logger = logging.getLogger(__name__)


class RunnerStateError(hal.GraphHalError, RuntimeError):
    """A runner was used out of order: run before capture, or capture twice."""


class CaptureLoop:
    """Captures a runner's buckets and holds what it captured (``graphs``, ``pool``, ``report``).

    forward, device:  the runner's step and device.
    config:           the runner's phase config; ``config`` becomes the one with the settled mode.
    phase:            ``decode`` or ``prefill``, for messages and the report.
    batch_kind:       what the runner's batches look like, for the ops' declared graph support.
    inputs:           the runner's static buffers (``StepInputs``), filled with padding for every capture.
    ranks:            the process group's agreements (``SoloRank`` without one).
    watch:            the addresses the graphs read, recorded after the largest bucket and checked after the others.
    pool:             a pool to share with another runner, or None for one of this runner's own.
    agrees_per_run:   whether the runner agrees with its ranks on every run: part of the plan every rank agrees on.
    request_outputs:  the forward's dict outputs with one row per request rather than per batch row.
    """

    def __init__(
        self,
        forward: Callable[..., Any],
        device: "hal.Device",
        config: PhaseConfig,
        *,
        phase: str,
        batch_kind: "hal.BatchKind",
        inputs: StepInputs,
        ranks: "RankGroup | SoloRank",
        watch: AddressWatch,
        pool: Any,
        agrees_per_run: bool,
        request_outputs: frozenset[str] = frozenset(),
    ) -> None:
        assert config.buckets is not None  # resolved by the config
        self.forward = forward
        self.device = device
        self.requested_config = config
        self.config = config  # the requested config until the mode is settled, then the settled one
        self.mode_reason = ""  # why the runner captures in its mode (runners.mode_choice)
        self.phase = phase
        self.batch_kind = batch_kind
        self.buckets = BucketPolicy(config.buckets)
        self.inputs = inputs
        self.ranks = ranks
        self.watch = watch
        self.pool = pool
        self.agrees_per_run = agrees_per_run
        self.request_outputs = request_outputs
        self.graphs: dict[int, CapturedStep] = {}
        self.report: CaptureReport | None = None
        self.inference_mode = False  # the inference mode the graphs were captured in (see _start)
        self.thread_owner = owner_of_pool(pool)  # a pool shared with another runner shares its thread
        self._owns_pool = False  # whether this loop made the pool (rather than being handed one to share)
        self.strategy: BucketCapture | None = None  # how each bucket is captured: built once the mode is settled
        self._started: CaptureMemory | None = None

    @property
    def requested_mode(self) -> str:
        return self.requested_config.mode

    @property
    def captures_graphs(self) -> bool:
        return self.config.mode != hal.GraphMode.DISABLED

    # --- the loop ----------------------------------------------------------------------------------------

    def capture(self) -> CaptureReport:
        """Capture every bucket (see ``BucketedRunner.capture``) and return the report."""
        if self.report is not None:
            raise RunnerStateError("this runner has already captured its graphs; make a new runner to capture again")
        with frozen_gc():  # no collection in the whole capture, the largest bucket's included
            if self._started is None:
                self._start()
            started = self._started
            assert started is not None
            try:
                # In the inference mode the largest bucket was captured in (estimate_pool_bytes may have run
                # under another): one compile and one set of graphs serve every bucket.
                same_mode = torch.is_inference_mode_enabled() == started.inference_mode
                with contextlib.nullcontext() if same_mode else torch.inference_mode(started.inference_mode), torch.no_grad():
                    rest = started.order[1:]
                    shown = self.config.show_progress and bool(rest)
                    use = None  # a bucket's memory after is the next one's before: nothing runs between them
                    for bucket in progress(rest, f"graphhal: capturing {self.phase} graphs", shown):
                        use = self._capture_bucket(bucket, started, use)
            except BaseException:
                self.release()
                raise
        self._started = None
        if started.order and self.config.compile_cache_dir is not None:
            CompileCache(self.config.compile_cache_dir).save()  # for the next process: what this one compiled
        self.report = CaptureReport(
            self.phase, self.config.mode, str(self.device), tuple(started.order), time.perf_counter() - started.started,
            started.pool_bytes if started.order else 0, tuple(started.added), started.estimate,
            device_bytes=tuple(started.device_added), bucket_seconds=tuple(started.seconds),
            query_tokens=getattr(self.config, "query_tokens", 1),
        )
        logger.info(self.report.summary())
        return self.report

    def estimate_pool_bytes(self) -> int:
        """See ``BucketedRunner.estimate_pool_bytes``."""
        if self.report is not None:
            return sum(self.report.added_bytes)
        if self._started is None:
            with frozen_gc():
                self._start()
        assert self._started is not None
        return self._started.estimate

    def release(self) -> None:
        """Drop every graph this loop captured and, when it made the pool, the pool; it can capture again."""
        self.graphs.clear()
        if self.strategy is not None:
            self.strategy.drop()
        self.strategy = None
        self._started = None
        self.report = None
        if self._owns_pool:
            # With its last graph gone a device may release a private pool (CUDA does): a retry must start
            # from a new one rather than capture into the released handle. The thread rule stays this
            # runner's own until it has a pool again.
            self.pool = None
            self._owns_pool = False
            self.thread_owner = ThreadOwner().adopting(self.thread_owner)

    def _start(self) -> None:
        """Agree, settle the mode, make the pool, and capture the largest bucket; check the budget against it.
        Leaves ``_started`` for ``capture()`` to go on with. The mode is settled afresh from the requested
        config every time: a capture retried after a failure chooses again."""
        self.config = self.requested_config
        if self.config.compile_cache_dir is not None:
            # Before anything runs the forward: mode auto's eager run already JIT-compiles Triton kernels.
            CompileCache(self.config.compile_cache_dir).activate()
        # In every mode: a rank running eagerly while the others capture is a mismatch. Before mode auto's
        # eager run: it runs the forward's collectives, which every rank must join.
        self.ranks.agree_on_plan(self.plan(), mode=self.config.mode)
        self._settle_mode()
        if self.config.mode != self.requested_mode:
            self.ranks.agree_on_plan(self.plan(), mode=self.config.mode)  # every rank chose the same
        started = time.perf_counter()
        if not self.captures_graphs:
            self._started = CaptureMemory(started, [], 0)
            return
        if self.pool is None:
            self.pool, self._owns_pool = self.device.graph_pool(), True
        self.thread_owner = owner_of_pool(self.pool).adopting(self.thread_owner)
        order = self.buckets.capture_order()
        # Replays run in the inference mode the graphs were captured in, whatever mode the server runs them
        # in: Dynamo guards compiled code on it (a piecewise forward would compile again), and tensors made
        # during an inference-mode capture cannot be written outside inference mode (breakable eager steps).
        self.inference_mode = torch.is_inference_mode_enabled()
        memory = CaptureMemory(started, order, self._pool_bytes(), self.inference_mode)
        try:
            self.strategy = bucket_capture(
                self.forward, self.device, self.config, [slot.name for slot in self.inputs.row_slots],
                after_warmup=functools.partial(self.ranks.after_warmup, mode=self.config.mode), batch=self.batch_kind,
            )
            self.strategy.prepare(self.pool)
            budget, made = self.device.graph_budget(), self.device.plugin_graphs_made
            with torch.no_grad():  # under the caller's frozen_gc
                self._capture_bucket(order[0], memory)
            error = None
            try:
                memory.order = fit_to_budget(order, self.device.plugin_graphs_made - made, budget, self.config, str(self.device))
            except GraphBudgetError as exc:
                error = exc
            self.ranks.agree("the graph budget check", error, bucket=order[0], mode=self.config.mode)
            self.buckets.keep_only(sorted(memory.order))  # the dispatch pads to captured buckets only
            self.ranks.agree_on_plan(self.plan(), mode=self.config.mode)  # every rank kept the same buckets
            error = memory.over_budget(self.config, self.phase, len(memory.order))
            self.ranks.agree("the pool budget check", error, bucket=order[0], mode=self.config.mode)
        except BaseException:
            self.release()
            raise
        self._started = memory

    def _settle_mode(self) -> None:
        """Mode ``auto``: pick the mode from what the forward's ops allow; ``full``: check that they allow it
        (``runners.mode_choice``). The forward runs once eagerly at the largest bucket, all padding: what the
        largest batch reaches, which a smaller one may not (an op chosen by batch size)."""
        if self.config.mode not in (hal.GraphMode.AUTO, hal.GraphMode.FULL):
            self.mode_reason = f"mode {self.config.mode} as configured"
            return
        largest = self.buckets.max_size
        self.inputs.fill_padding(largest)
        choice, error = None, None
        try:
            choice = choose_mode(self.config, self.device, self.batch_kind, self.phase, self.forward, self.inputs.views(largest), largest)
        except Exception as exc:
            error = exc
        # Every rank learns whether every rank got through it (or raises on all).
        self.ranks.agree(f"mode {self.config.mode}'s eager run at bucket {largest}", error, bucket=largest, mode=self.config.mode)
        assert choice is not None
        self.mode_reason = choice.reason
        self.config = choice.config
        # A mode below full chosen by auto is never silent (vLLM PR 47460): a warning, with why.
        downgraded = self.requested_mode == hal.GraphMode.AUTO and self.config.mode != hal.GraphMode.FULL
        logger.log(logging.WARNING if downgraded else logging.INFO, "graphhal %s on %s: %s", self.phase, self.device, choice.reason)

    def _capture_bucket(self, bucket: int, started: CaptureMemory, before: DeviceUse | None = None) -> DeviceUse:
        """One bucket; across ranks, agree that every rank captured it (or raise on all of them). ``before``: the
        device's memory now, if read already (a pool's bytes cost a memory snapshot). Returns it after."""
        error = None
        before, began = before or device_use(self.device, self.pool), time.perf_counter()
        try:
            self.graphs[bucket] = self._capture_one(bucket)
        except RankCaptureError:
            raise  # every rank raises it at the same agreement point: nothing more to agree on
        except Exception as exc:
            error = exc
        self.ranks.agree(f"the capture of bucket {bucket}", error, bucket=bucket, mode=self.config.mode)
        after = device_use(self.device, self.pool)
        started.record(after.pool or 0, before, after, began)  # no pool: no pool bytes
        return after

    def _capture_one(self, bucket: int) -> CapturedStep:
        assert self.strategy is not None
        self.inputs.fill_padding(bucket)
        try:
            captured = self.strategy.capture(bucket, self.inputs.views(bucket))
            outputs = GraphOutputs(captured.outputs, bucket, self.request_outputs, self.inputs.max_requests)
            self.watch.settle(bucket, self.buckets.max_size, self.phase)
        except RankCaptureError:
            raise  # already says which rank failed where
        except WarmUpError as exc:
            what = (
                f"the eager warm-up of the {self.phase} forward for bucket {bucket} on {self.device} failed, before "
                f"any capture (a model error, not a graph error): {exc}"
            )
            raise hal.CaptureError(what, bucket=bucket, mode=self.config.mode, device=str(self.device)) from exc
        except Exception as exc:
            what = (
                f"capturing the {self.phase} graph for bucket {bucket} (mode {self.config.mode}) on {self.device} "
                f"failed: {type(exc).__name__}: {exc}"
            )
            raise hal.CaptureError(what, bucket=bucket, mode=self.config.mode, device=str(self.device)) from exc
        return CapturedStep(captured, outputs, outputs_static=captured.graph is not None)

    def _pool_bytes(self) -> int:
        return self.device.memory_stats(self.pool).pool_bytes or 0 if self.pool is not None else 0

    def plan(self) -> dict[str, Any]:
        """What this rank is about to capture, and how it will run: every rank of the group must say the same."""
        return {
            "phase": self.phase,
            "mode": self.config.mode,
            "compiler": self.config.compiler,
            "buckets": list(self.buckets.buckets),
            **self.inputs.plan(),
            "warm-up runs": self.config.warmup_runs,
            "eager fallback": self.config.eager_fallback,
            "breakable debug": breakable_debug(self.config),
            "agreement on every run (consensus_group)": self.agrees_per_run,
            "agreement_timeout_s": self.config.agreement_timeout_s,
        }
