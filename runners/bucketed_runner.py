"""``BucketedRunner``: what DecodeRunner and PrefillRunner share: buckets, static inputs, capture, replay.

A runner captures ``forward`` once per bucket, largest first, into one pool, and replays it for live
batches padded to the bucket. Its inputs are bucketed slots (one row per request in decode, per token in
prefill) and, optionally, fixed slots padded to a fixed row count every run (per-request prefill inputs).
The runner never names a device: everything device-specific goes through ``hal.Device``.

Outputs of ``run`` are views into graph memory. The next ``run`` (of any bucket: all graphs share one
pool) overwrites them, so consume or copy them before the next step.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

import hal
from hal.graph_per_key import WarmUpError
from runners.address_watch import AddressWatch
from runners.bucket_capture import CapturedBucket, breakable_debug, bucket_capture
from runners.buckets import BucketPolicy
from runners.capture_report import CaptureReport
from runners.compile_cache import CompileCache
from runners.config import PhaseConfig
from runners.gc_freeze import frozen_gc
from runners.graph_outputs import GraphOutputs
from runners.input_slots import InputSlot
from runners.mode_choice import choose_mode
from runners.progress import progress
from runners.rank_group import RankCaptureError, RankGroup
from runners.static_inputs import StaticInputs
from runners.thread_owner import ThreadOwner, owner_of_pool

logger = logging.getLogger(__name__)


class RunnerStateError(hal.GraphHalError, RuntimeError):
    """A runner was used out of order: run before capture, or capture twice."""


class PoolBudgetError(hal.GraphHalError, ValueError):
    """Capturing every bucket would take more graph pool memory than the config's ``pool_budget_mib``."""


@dataclass
class _CaptureProgress:
    """A capture under way: begun by ``estimate_pool_bytes`` (or ``capture``), finished by ``capture``."""

    started: float
    order: list[int]  # every bucket, largest first; empty when nothing is captured
    before: int  # pool bytes before this runner captured (a shared pool holds another runner's graphs)
    inference_mode: bool = False  # the inference mode the capture began in: every bucket is captured in it
    added: list[int] = field(default_factory=list)  # pool bytes each captured bucket added, in order
    estimate: int = 0  # what the largest bucket took: what all of them will take

    @property
    def pool_bytes(self) -> int:
        """The pool as last read: before this runner, plus what its buckets added so far."""
        return self.before + sum(self.added)


@dataclass
class _Bucket:
    captured: CapturedBucket
    outputs: GraphOutputs  # the outputs as captured
    # Whether every replay hands back the captured output tensors. True for one device graph; a piecewise
    # forward returns what its last piece returns, checked on the first replay.
    outputs_static: bool
    addresses_checked: bool = False  # with check_addresses "first_replay": whether this bucket was checked

    @property
    def graph(self) -> Any:
        return self.captured.graph


class BucketedRunner:
    """See ``DecodeRunner`` and ``PrefillRunner`` for the arguments; this class holds the shared mechanics."""

    phase = ""
    batch_kind: hal.BatchKind  # what its batches look like, for the ops' declared graph support

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
        watched_tensors: Mapping[str, Any] | None = None,
        group: Any = None,
        consensus_group: Any = None,
    ) -> None:
        self.forward = forward
        self.config = config
        self.device = hal.get_device(device)
        config.check_device(self.device)
        # Across ranks: ``group`` captures in lockstep (its collectives are in the graphs), ``consensus_group``
        # also agrees on every run's bucket and on graph vs eager (data parallel).
        if group is not None:
            self.device.check_group(group)
        self.group = RankGroup(group, config.agreement_timeout_s) if group is not None else None
        self.consensus = RankGroup(consensus_group, config.agreement_timeout_s) if consensus_group is not None else None
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
        self._address_watch = self._watch(self.watched_tensors)
        self._check_every_replay = config.check_addresses == "every_replay"
        self._thread_owner: ThreadOwner | None = None  # bound on the first run, shared by the pool's runners
        self._inference_mode = False  # the inference mode capture ran in (see capture)
        self._owns_pool = False  # whether capture() made the pool (rather than being handed one to share)
        self.requested_mode = config.mode  # config.mode becomes the chosen one at capture (mode "auto")
        self.mode_reason = ""  # why the runner captures in its mode (runners.mode_choice)
        self._capture = self._bucket_capture(config)
        self._graphs: dict[int, _Bucket] = {}
        self._progress: _CaptureProgress | None = None
        self.report: CaptureReport | None = None
        # On devices that bake host values into graphs (NPU attention lengths), these slots' live values go
        # to Device.update before every replay of a graph that holds them: the lengths attended to, and in a
        # packed (prefill) batch the new tokens per request.
        self._updated_slots = (
            [s for s in (*self.slots, *self.fixed_slots) if s.role in (hal.SlotRole.SEQ_LENS, hal.SlotRole.QUERY_LENS)]
            if self.device.needs_graph_update
            else []
        )
        # Per-request token counts of a packed batch: checked on the host against the batch's token rows
        # before every replay, because a padded graph cannot tell (its bucket has room for the extra tokens).
        self._query_len_slots = [s for s in (*self.slots, *self.fixed_slots) if s.role == hal.SlotRole.QUERY_LENS]

    def _bucket_capture(self, config: PhaseConfig) -> Any:
        return bucket_capture(
            self.forward,
            self.device,
            config,
            [slot.name for slot in self.slots],
            after_warmup=self._agree_after_warmup if self.group is not None else None,
            batch=self.batch_kind,
        )

    def _watch(self, watched_tensors: Mapping[str, Any]) -> AddressWatch:
        watch = AddressWatch()
        watch.add_entries("input slot", self.static_inputs.buffers, list(self.static_inputs.buffers))
        if self.fixed_inputs is not None:
            watch.add_entries("input slot", self.fixed_inputs.buffers, list(self.fixed_inputs.buffers))
        for name, source in watched_tensors.items():
            watch.add_source(name, source)
        return watch

    # --- capture ----------------------------------------------------------------------------------------

    @property
    def captures_graphs(self) -> bool:
        return self.config.mode != hal.GraphMode.DISABLED

    @property
    def captured(self) -> bool:
        return self.report is not None

    def capture(self) -> CaptureReport:
        """Capture every bucket, largest first, into one shared pool; return (and log) the report.

        A failure raises ``hal.CaptureError`` naming the bucket, mode and device, after dropping every graph
        this call made: the runner is left uncaptured and the device usable, so ``capture()`` can be retried.
        With ``pool_budget_mib`` set, a pool estimated over it stops the capture after the largest bucket
        (``estimate_pool_bytes``), before any other bucket is captured.
        """
        if self.captured:
            raise RunnerStateError("this runner has already captured its graphs; make a new runner to capture again")
        with frozen_gc():  # no collection in the whole capture, the largest bucket's included
            if self._progress is None:
                self._start_capture()
            progress_ = self._progress
            assert progress_ is not None
            if progress_.order:  # nothing to capture in mode disabled
                try:
                    # In the inference mode the largest bucket was captured in (estimate_pool_bytes may have run
                    # under another): one compile and one set of graphs serve every bucket.
                    same_mode = torch.is_inference_mode_enabled() == progress_.inference_mode
                    with contextlib.nullcontext() if same_mode else torch.inference_mode(progress_.inference_mode), torch.no_grad():
                        rest = progress_.order[1:]
                        for bucket in progress(rest, f"graphhal: capturing {self.phase} graphs", self.config.show_progress and bool(rest)):
                            self._graphs[bucket] = self._capture_bucket_with_ranks(bucket)
                            progress_.added.append(self._pool_bytes() - progress_.pool_bytes)
                except BaseException:
                    self._release_graphs(self._owns_pool)
                    self._progress = None  # a retry starts from the beginning
                    raise
        self._progress = None
        if progress_.order and self.config.compile_cache_dir is not None:
            CompileCache(self.config.compile_cache_dir).save()  # for the next process: what this one compiled
        self.report = CaptureReport(
            self.phase, self.config.mode, str(self.device), tuple(progress_.order), time.perf_counter() - progress_.started,
            progress_.pool_bytes if progress_.order else 0, tuple(progress_.added), progress_.estimate,
        )
        logger.info(self.report.summary())
        return self.report

    def estimate_pool_bytes(self) -> int:
        """How much graph pool memory capturing every bucket will take, known before the other buckets are
        captured: the largest bucket is captured (as ``capture()`` begins) and its pool measured; every smaller
        bucket reuses that memory (graphs keep only aliases of what they leave in the pool), so the others add
        little (the capture report lists what each added). ``capture()`` then goes on from there. Bytes this
        runner adds to its pool (a shared pool's earlier contents not counted); 0 in mode disabled."""
        if self.report is not None:
            return sum(self.report.added_bytes)
        if self._progress is None:
            with frozen_gc():
                self._start_capture()
        assert self._progress is not None
        return self._progress.estimate

    def _start_capture(self) -> None:
        """Choose the mode, agree across ranks, make the pool, prepare, and capture the largest bucket; check
        the pool budget against it. Leaves ``_progress`` for ``capture()`` to go on with."""
        device = self.device
        if self.config.compile_cache_dir is not None:
            # Before anything runs the forward: mode auto's eager run already JIT-compiles Triton kernels.
            CompileCache(self.config.compile_cache_dir).activate()
        if self.group is not None:  # in every mode: a rank running eagerly while the others capture is a mismatch
            # Before mode auto's eager run: it runs the forward's collectives, which every rank must join.
            self.group.agree_on_plan(self._plan(), mode=self.config.mode, device=str(device))
        self._choose_mode()
        mode = self.config.mode
        if self.group is not None and mode != self.requested_mode:
            self.group.agree_on_plan(self._plan(), mode=mode, device=str(device))  # every rank chose the same
        started = time.perf_counter()
        if not self.captures_graphs:
            self._progress = _CaptureProgress(started, [], 0)
            return
        owns_pool = self._owns_pool = self.pool is None
        if owns_pool:
            self.pool = device.graph_pool()
        self._thread_owner = owner_of_pool(self.pool).adopting(self._thread_owner)
        order = self.buckets.capture_order()
        # Replays run in the inference mode the graphs were captured in, whatever mode the server runs them
        # in: Dynamo guards compiled code on it (a piecewise forward would compile again), and tensors made
        # during an inference-mode capture cannot be written outside inference mode (breakable eager steps).
        self._inference_mode = torch.is_inference_mode_enabled()
        progress_ = _CaptureProgress(started, order, self._pool_bytes(), torch.is_inference_mode_enabled())
        try:
            self._capture.prepare(self.pool)
            with torch.no_grad():  # under the caller's frozen_gc
                self._graphs[order[0]] = self._capture_bucket_with_ranks(order[0])
            progress_.added.append(self._pool_bytes() - progress_.pool_bytes)
            progress_.estimate = progress_.added[0]
            self._check_budget(progress_.estimate, order[0])
        except BaseException:
            self._release_graphs(owns_pool)
            raise
        self._progress = progress_

    def _check_budget(self, estimate: int, largest: int) -> None:
        budget = self.config.pool_budget_mib
        error = None
        if budget is not None and estimate > budget * hal.MIB:
            size = self.config.size_field
            error = PoolBudgetError(
                f"{self.phase}: the graph pool for {len(self.buckets.buckets)} buckets up to {largest} would take about "
                f"{estimate / hal.MIB:.1f} MiB (bucket {largest} captured alone, which every smaller bucket reuses), "
                f"over pool_budget_mib {budget:g}. Capture up to a smaller {size} (the pool grows with the largest "
                "bucket), or raise the budget; fewer buckets save little, since they share the largest's memory. "
                "Nothing else was captured."
            )
        if self.group is not None:
            self.group.agree("the pool budget check", error, bucket=largest, mode=self.config.mode, device=str(self.device))
        if error is not None:
            raise error

    def _pool_bytes(self) -> int:
        return self.device.memory_stats(self.pool).pool_bytes or 0 if self.pool is not None else 0

    def _choose_mode(self) -> None:
        """Mode ``auto``: pick the mode from what the forward's ops allow; ``full``: check that they allow it
        (``runners.mode_choice``). The forward runs once eagerly at the smallest bucket, all padding."""
        if self.config.mode not in (hal.GraphMode.AUTO, hal.GraphMode.FULL):
            self.mode_reason = f"mode {self.config.mode} as configured"
            return
        smallest = self.buckets.capture_order()[-1]
        self.static_inputs.fill_padding(smallest)
        if self.fixed_inputs is not None:
            self.fixed_inputs.fill_padding(self.fixed_inputs.capacity)
        choice, error = None, None
        try:
            choice = choose_mode(self.config, self.device, self.batch_kind, self.phase, self.forward, self._views(smallest))
        except Exception as exc:
            error = exc
        if self.group is not None:  # every rank learns whether every rank got through it (or raises on all)
            stage = f"mode {self.config.mode}'s eager run at bucket {smallest}"
            self.group.agree(stage, error, bucket=smallest, mode=self.config.mode, device=str(self.device))
        if isinstance(error, hal.UnsupportedModeError):
            raise error  # mode full over an op that cannot be captured: says which
        if error is not None:
            what = (
                f"the eager run of the {self.phase} forward at bucket {smallest} on {self.device}, which mode "
                f"{self.config.mode} makes to see what the forward's ops allow, failed before any capture (a model "
                f"error, not a graph error): {type(error).__name__}: {error}"
            )
            raise hal.CaptureError(what, bucket=smallest, mode=self.config.mode, device=str(self.device)) from error
        assert choice is not None
        self.mode_reason = choice.reason
        if choice.config.mode != self.config.mode:
            self.config = choice.config
            self._capture = self._bucket_capture(choice.config)
        logger.info("graphhal %s on %s: %s", self.phase, self.device, choice.reason)

    def close(self) -> None:
        """Drop every graph this runner captured and let go of its pool; the runner can capture again.

        Graph memory goes back to the device once nothing else holds the pool (a runner sharing it keeps it).
        Outputs handed out before are views into that memory: do not read them after closing.
        """
        self._release_graphs(self._owns_pool)
        self._progress = None
        self.report = None

    def _release_graphs(self, owns_pool: bool) -> None:
        self._graphs.clear()
        self._capture.drop()
        if owns_pool:
            # With its last graph gone a device may release a private pool (CUDA does): a retry must start
            # from a new one rather than capture into the released handle. The thread rule stays this
            # runner's own until it has a pool again.
            self.pool = None
            self._thread_owner = ThreadOwner().adopting(self._thread_owner)

    def _plan(self) -> dict[str, Any]:
        """What this rank is about to capture: every rank of the group must say the same."""
        def slots(slots: Sequence[InputSlot]) -> list[tuple[str, str, tuple[int, ...]]]:
            return [(slot.name, str(slot.dtype), slot.row_shape) for slot in slots]

        return {
            "phase": self.phase,
            "mode": self.config.mode,
            "compiler": self.config.compiler,
            "buckets": list(self.buckets.buckets),
            "input slots": slots(self.slots),
            "request slots": slots(self.fixed_slots),
            "request rows": 0 if self.fixed_inputs is None else self.fixed_inputs.capacity,
            "warm-up runs": self.config.warmup_runs,
            "eager fallback": self.config.eager_fallback,
            "breakable debug": breakable_debug(self.config),
        }

    def _agree_after_warmup(self, bucket: int, error: BaseException | None, what: str) -> None:
        assert self.group is not None
        self.group.agree(
            f"the warm-up of {what} at bucket {bucket}", error, bucket=bucket, mode=self.config.mode, device=str(self.device)
        )

    def _capture_bucket_with_ranks(self, bucket: int) -> _Bucket:
        """One bucket; across ranks, then agree that every rank captured it (or raise on all of them)."""
        if self.group is None:
            return self._capture_bucket(bucket)
        try:
            captured = self._capture_bucket(bucket)
        except RankCaptureError:
            raise  # every rank raises it at the same agreement point: nothing more to agree on
        except Exception as exc:
            self.group.agree(f"the capture of bucket {bucket}", exc, bucket=bucket, mode=self.config.mode, device=str(self.device))
            raise  # unreachable: agreeing on a failure raises
        self.group.agree(f"the capture of bucket {bucket}", None, bucket=bucket, mode=self.config.mode, device=str(self.device))
        return captured

    def _capture_bucket(self, bucket: int) -> _Bucket:
        self.static_inputs.fill_padding(bucket)
        if self.fixed_inputs is not None:
            self.fixed_inputs.fill_padding(self.fixed_inputs.capacity)
        inputs = self._views(bucket)
        try:
            captured = self._capture.capture(bucket, inputs)
            outputs = GraphOutputs(captured.outputs, bucket)
            self._settle_addresses(bucket)
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
        return _Bucket(captured, outputs, outputs_static=captured.graph is not None)

    def _settle_addresses(self, bucket: int) -> None:
        """After the largest bucket: record where the graphs read (what a first forward allocated lazily
        included). After every later one: refuse a tensor that moved during the capture loop, since the graphs
        captured before it read the old one."""
        if bucket == self.buckets.max_size:
            self._address_watch.snapshot()
            return
        moved = self._address_watch.moved()
        if moved:
            raise hal.StaticAddressError(
                f"{', '.join(moved)} moved while the {self.phase} graphs were being captured (after the largest "
                f"bucket, before bucket {bucket}); the graphs captured earlier read the old memory. Allocate "
                "these tensors before capture and keep them in place."
            )

    def _views(self, bucket: int) -> dict[str, torch.Tensor]:
        views = self.static_inputs.views(bucket)
        if self.fixed_inputs is not None:
            views.update(self.fixed_inputs.views(self.fixed_inputs.capacity))
        return views

    # --- run --------------------------------------------------------------------------------------------

    def _check(self, batch: Mapping[str, torch.Tensor], allow_empty: bool = False) -> tuple[int, int]:
        """Validate a live batch; return its bucketed rows and fixed rows (0 without fixed slots). An empty
        batch (no rows) is a rank's idle step, allowed only with a consensus group."""
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"run() takes a mapping of slot name to tensor (e.g. {{'input_ids': tensor, ...}}), got "
                f"{type(batch).__name__}; this runner's slots: {', '.join(self._slot_names())}"
            )
        if self.fixed_inputs is None:
            rows, fixed_rows = self.static_inputs.check(batch, allow_empty), 0
        else:
            names = set(batch)
            fixed_names = {slot.name for slot in self.fixed_slots}
            row_names = {slot.name for slot in self.slots}
            unexpected = sorted(map(str, names - fixed_names - row_names))
            missing = sorted((fixed_names | row_names) - names)
            if unexpected or missing:
                raise ValueError(
                    "batch does not match the runner's input slots"
                    + (f"; missing: {', '.join(missing)}" if missing else "")
                    + (f"; unexpected: {', '.join(unexpected)}" if unexpected else "")
                    + f"; expected exactly: {', '.join(self._slot_names())}"
                )
            rows = self.static_inputs.check({name: batch[name] for name in row_names}, allow_empty)
            fixed_rows = self.fixed_inputs.check({name: batch[name] for name in fixed_names}, allow_empty)
        for slot in self._query_len_slots:
            self._check_query_lens(slot, batch[slot.name], rows)
        return rows, fixed_rows

    def _slot_names(self) -> list[str]:
        return sorted(slot.name for slot in (*self.slots, *self.fixed_slots))

    def _check_query_lens(self, slot: InputSlot, query_lens: torch.Tensor, rows: int) -> None:
        """Refuse per-request token counts that do not fit the batch's token rows, as eager attention does.

        Checked on host values: a padded graph has room for more tokens than the batch holds, so the device
        would never complain, and reading a device tensor here would cost a sync on every step. A server has
        these counts on the host anyway (it scheduled them); it passes them as a CPU tensor.
        """
        if query_lens.device.type != "cpu":
            raise ValueError(
                f"input slot {slot.name!r} (role {slot.role}) must be passed as a host (CPU) tensor: the runner "
                f"checks that its counts fit the batch's {rows} token rows before replaying, and reading it from "
                f"{query_lens.device} would cost a device sync per step. The runner copies it to the device itself."
            )
        counts = query_lens.tolist()
        if any(count < 0 for count in counts):
            raise ValueError(f"input slot {slot.name!r} has a negative token count: {counts}")
        total = sum(counts)
        if total > rows:
            raise ValueError(
                f"input slot {slot.name!r} adds up to {total} tokens but the batch has only {rows} token rows; "
                "each request's new tokens must be packed into the token slots"
            )

    def _fits(self, rows: int, fixed_rows: int) -> bool:
        fixed_fits = self.fixed_inputs is None or fixed_rows <= self.fixed_inputs.capacity
        return (rows == 0 or self.buckets.fits(rows)) and fixed_fits

    def can_run(self, batch: Mapping[str, torch.Tensor] | int) -> bool:
        """Whether a live batch (or a row count) runs on captured graphs rather than eagerly."""
        rows, fixed_rows = (batch, 0) if isinstance(batch, int) and not isinstance(batch, bool) else self._check(batch)
        return self.captures_graphs and self.captured and self._fits(rows, fixed_rows)

    def claim_current_thread(self) -> None:
        """Make the calling thread the one that runs this runner and every runner sharing its pool.

        Only one thread may run them (see ``runners.thread_owner``); the first ``run`` claims them. Call this
        when a server moves its model loop to another thread; the thread that ran them before must stop.
        """
        self._owner().claim()

    def _owner(self) -> ThreadOwner:
        if self._thread_owner is None:  # bound to the pool's owner at capture (adopting this one's thread)
            self._thread_owner = owner_of_pool(self.pool)
        return self._thread_owner

    def run(self, batch: Mapping[str, torch.Tensor]) -> Any:
        """Run the forward for a live batch: replay its bucket's graphs, or run eagerly.

        Graph outputs are views into the graph pool, valid until the next ``run`` of this runner (or of any
        runner sharing its pool). A batch over the phase maximum runs eagerly, or raises when eager fallback
        is off. Only one thread runs a runner (``claim_current_thread``). Any slot may be passed as a host
        (CPU) tensor: the runner copies it into its device buffer.
        """
        if self.consensus is not None:
            return self._run_agreed(batch)
        (self._thread_owner or self._owner()).check(f"this {self.phase} runner")
        rows, fixed_rows = self._check(batch)
        if self.captures_graphs and not self.captured:
            raise RunnerStateError("call capture() before run() (or use mode 'disabled' to run eagerly)")
        if not self._fits(rows, fixed_rows):
            if not self.config.eager_fallback:
                raise ValueError(f"{self._describe_misfit(rows, fixed_rows)} and eager fallback is off; split the batch")
            return self._run_eager(batch)
        if not self.captures_graphs:
            return self._run_eager(batch)
        return self._replay_bucket(batch, rows, fixed_rows, self.buckets.bucket_for(rows))

    def _run_agreed(self, batch: Mapping[str, torch.Tensor]) -> Any:
        """Data parallel: every rank pads to the bucket of the largest batch across ranks, and all take graphs
        or all run eagerly, so no rank replays a graph holding collectives while another runs eagerly.

        Every rank takes part in the agreement whatever went wrong here first (a refused batch, a moved
        tensor, a wrong thread): a rank that left without it would pair its peers' next agreement, and their
        collectives, with its own next step. A failure on any rank is an error on every rank.
        """
        assert self.consensus is not None
        rows = fixed_rows = 0
        fits, error = True, None
        try:
            (self._thread_owner or self._owner()).check(f"this {self.phase} runner")
            rows, fixed_rows = self._check(batch, allow_empty=True)
            if self.captures_graphs and not self.captured:
                raise RunnerStateError("call capture() before run() (or use mode 'disabled' to run eagerly)")
            fits = self._fits(rows, fixed_rows)
            if fits and self.captures_graphs:
                self._address_watch.check(f"the {self.phase} graphs")
        except Exception as exc:
            error = exc
        largest, misfits = self.consensus.agree_on_batch(rows, fits, error)
        if misfits:
            if not self.config.eager_fallback:
                mine = f"; here: {self._describe_misfit(rows, fixed_rows)}" if not fits else ""
                raise ValueError(
                    f"the batch of rank(s) {', '.join(map(str, misfits))} of the consensus group does not fit the "
                    f"graphs and eager fallback is off{mine}; every rank refuses this step"
                )
            return self._run_eager_padded(batch, rows, largest)
        if not self.captures_graphs:
            return self._run_eager_padded(batch, rows, largest)
        return self._replay_bucket(batch, rows, fixed_rows, self.buckets.bucket_for(max(largest, 1)), checked=True)

    def _run_eager_padded(self, batch: Mapping[str, torch.Tensor], rows: int, largest: int) -> Any:
        """Eagerly, but padded to the largest batch across ranks, so collectives inside the forward see the
        same shapes on every rank (an idle rank runs padded rows only); the outputs' live rows come back."""
        if rows == largest:
            return self._run_eager(batch)
        device = self.device.torch_device
        padded = dict(batch)
        for slot in self.slots:
            value = batch[slot.name].to(device)
            fill = torch.full((largest - rows, *slot.row_shape), slot.fill, dtype=slot.dtype, device=device)
            padded[slot.name] = torch.cat([value, fill])
        return GraphOutputs(self._run_eager(padded), largest).live_rows(rows)

    def _replay_bucket(
        self, batch: Mapping[str, torch.Tensor], rows: int, fixed_rows: int, bucket: int, *, checked: bool = False
    ) -> Any:
        captured = self._graphs[bucket]
        if not checked and (self._check_every_replay or not captured.addresses_checked):
            self._address_watch.check(f"the {self.phase} graph for bucket {bucket}")
            captured.addresses_checked = True
        if torch.is_inference_mode_enabled() == self._inference_mode:
            outputs = self._replay(captured, batch, rows, bucket, fixed_rows)
        else:
            with torch.inference_mode(self._inference_mode):
                outputs = self._replay(captured, batch, rows, bucket, fixed_rows)
        if captured.outputs_static:  # a graph: it wrote into the outputs captured
            return captured.outputs.live_rows(rows)
        replayed = GraphOutputs(outputs, bucket)
        captured.outputs_static = replayed.same_tensors(captured.outputs)
        return replayed.live_rows(rows)

    def _replay(self, captured: _Bucket, batch: Mapping[str, torch.Tensor], rows: int, bucket: int, fixed_rows: int) -> Any:
        # No torch.no_grad() needed around the copies: an input that requires grad was refused by _check.
        self.static_inputs.load(batch, rows, bucket)
        if self.fixed_inputs is not None:
            self.fixed_inputs.load(batch, fixed_rows, self.fixed_inputs.capacity)
        if self._updated_slots and captured.graph is not None:
            self._update_graph(captured.graph, batch, rows, bucket, fixed_rows)
        return captured.captured.run()

    def _describe_misfit(self, rows: int, fixed_rows: int) -> str:
        if not self.buckets.fits(rows):
            return f"batch of {rows} rows exceeds {self.config.size_field} {self.buckets.max_size}"
        assert self.fixed_inputs is not None
        return f"batch has {fixed_rows} rows of per-request inputs, more than the {self.fixed_inputs.capacity} the runner holds"

    def _update_graph(self, graph: Any, batch: Mapping[str, torch.Tensor], rows: int, bucket: int, fixed_rows: int) -> None:
        # A fresh host list per run: the device may apply it asynchronously, so the runner must never hand
        # over a buffer it will mutate for the next step while this one may still be read. (A host tensor
        # in the batch costs no device sync here; a device tensor costs one.)
        params = {}
        for slot in self._updated_slots:
            is_fixed = self.fixed_inputs is not None and slot in self.fixed_slots
            live, padded = (fixed_rows, self.fixed_inputs.capacity) if is_fixed else (rows, bucket)  # type: ignore[union-attr]
            params[slot.role] = batch[slot.name].tolist() + [slot.fill] * (padded - live)
        self.device.update(graph, params)

    def _run_eager(self, batch: Mapping[str, torch.Tensor]) -> Any:
        device = self.device.torch_device
        # The forward sees every slot on the device, as it does in a graph, whatever the server passed.
        inputs = {name: value if value.device == device else value.to(device) for name, value in batch.items()}
        with torch.no_grad():
            return self.forward(**inputs)
