"""``BucketedRunner``: what DecodeRunner and PrefillRunner share, on three rooms of its own.

- ``runners.step_inputs``: every input buffer of a step (row slots padded to the bucket, request slots to a
  fixed count), checked, loaded and padded by one object;
- ``runners.capture_loop``: the capture, mode settled first, largest bucket first, one pool, ranks in lockstep;
- ``runners.graph_dispatch``: which graph a batch runs on, or why it runs eagerly, decided in one place.

What stays here is the run path: check the batch, agree across ranks, dispatch, then copy in, check
addresses, update, replay and hand back the live rows (or run eagerly). The runner never names a device:
everything device-specific goes through ``hal.Device``.

Outputs of ``run`` are views into graph memory. The next ``run`` (of any bucket: all graphs share one
pool) overwrites them, so consume or copy them before the next step.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

import hal
from runners.address_watch import AddressWatch
from runners.buckets import BucketPolicy
from runners.bucket_capture import CapturedStep
from runners.capture_loop import CaptureLoop, RunnerStateError
from runners.capture_report import CaptureReport
from runners.debug_switches import DebugSwitches
from runners.config import PhaseConfig
from runners.graph_dispatch import Dispatch, GraphDispatcher
from runners.graph_outputs import GraphOutputs
from runners.input_slots import InputSlot
from runners.output_tree import map_tensors
from runners.rank_group import rank_group
from runners.step_counters import RunnerStats, StepCounters
from runners.step_handle import KeptOutputs, StepHandle
from runners.step_inputs import BatchRows, StepInputs


class BucketedRunner(RunnerStats):
    """See ``DecodeRunner`` and ``PrefillRunner`` for the arguments; this class holds the shared run path."""

    phase = ""
    batch_kind: hal.BatchKind  # what its batches look like, for the ops' declared graph support

    def __init__(
        self,
        forward: Callable[..., Any],
        slots: Sequence[InputSlot],
        device: "str | hal.Device",
        config: PhaseConfig,
        *,
        request_slots: Sequence[InputSlot] = (),
        max_requests: int = 0,
        request_outputs: Sequence[str] = (),
        pool: Any = None,
        watched_tensors: Mapping[str, Any] | None = None,
        group: Any = None,
        consensus_group: Any = None,
    ) -> None:
        self.forward = forward
        self.counters = StepCounters(self.phase)  # runners.step_counters: stats(), log_stats(), counting
        self.debug = DebugSwitches()  # runners.debug_switches: verify on capture, poison stale outputs
        self.device = hal.get_device(device)
        config.check_device(self.device)
        assert config.buckets is not None  # resolved by the config
        self.inputs = StepInputs(slots, request_slots, config.max_size, max_requests, self.device)
        self.request_outputs = frozenset(request_outputs)  # dict outputs with one row per request
        self.watched_tensors = dict(watched_tensors or {})
        self._address_watch = AddressWatch.of_runner(self.inputs, self.watched_tensors)
        self._kept = KeptOutputs()  # submit(keep=...): refused before a step once the output names are known
        self._check_every_replay = config.check_addresses == "every_replay"
        # Across ranks: ``group`` captures in lockstep (its collectives are in the graphs), ``consensus_group``
        # also agrees on every run's bucket and on graph vs eager (data parallel). Without a group, each is a
        # SoloRank whose agreements are this process's own outcomes.
        if group is not None:
            self.device.check_group(group)
        self.consensus = rank_group(consensus_group, config.agreement_timeout_s, str(self.device))
        self._capture = CaptureLoop(
            forward, self.device, config, phase=self.phase, batch_kind=self.batch_kind, inputs=self.inputs,
            ranks=rank_group(group, config.agreement_timeout_s, str(self.device)), watch=self._address_watch,
            pool=pool, agrees_per_run=self.consensus.is_group, request_outputs=self.request_outputs,
        )
        self._dispatcher = self._make_dispatcher()

    def _make_dispatcher(self) -> GraphDispatcher:
        return GraphDispatcher(
            self._capture.buckets,
            captures_graphs=self.captures_graphs,
            eager_fallback=self.config.eager_fallback,
            across_ranks=self.consensus.is_group,
        )

    # --- what the capture settled ------------------------------------------------------------------------

    @property
    def slots(self) -> tuple[InputSlot, ...]:
        """Every input slot (the per-row ones, then the per-request ones), with the dtypes and fills the device's
        conventions gave their roles: what a batch must hold."""
        return self.inputs.slots

    @property
    def config(self) -> PhaseConfig:
        """The config: as requested until ``capture()`` settles the mode (``auto`` becomes a mode), then as
        captured."""
        return self._capture.config

    @property
    def requested_mode(self) -> str:
        return self._capture.requested_mode

    @property
    def mode_reason(self) -> str:
        """Why the runner captures in its mode (``runners.mode_choice``), in a sentence."""
        return self._capture.mode_reason

    @property
    def buckets(self) -> BucketPolicy:
        return self._capture.buckets

    @property
    def pool(self) -> Any:
        return self._capture.pool

    @property
    def report(self) -> CaptureReport | None:
        return self._capture.report

    @property
    def graphs(self) -> Mapping[int, CapturedStep]:  # the captured steps by bucket, for inspection and tests
        return self._capture.graphs

    captures_graphs = property(lambda self: self._capture.captures_graphs)
    captured = property(lambda self: self._capture.report is not None)

    # --- capture -----------------------------------------------------------------------------------------

    def capture(self) -> CaptureReport:
        """Capture every bucket, largest first, into one shared pool; return (and log) the report.

        A failure raises ``hal.CaptureError`` naming the bucket, mode and device, after dropping every graph
        this call made: the runner is left uncaptured and the device usable, so ``capture()`` can be retried.
        With ``pool_budget_mib`` set, a pool estimated over it stops the capture after the largest bucket
        (``estimate_pool_bytes``), before any other bucket is captured.
        """
        report = self._capture.capture()
        self._dispatcher = self._make_dispatcher()  # the settled mode decides between graphs and eager
        self.debug.after_capture(self)
        return report

    def estimate_pool_bytes(self) -> int:
        """The graph pool bytes capturing every bucket will add (0 in mode disabled), known before the smaller
        buckets are captured: the largest is captured and measured, and the others reuse its memory
        (docs/memory-and-startup.md); ``capture()`` goes on from there."""
        return self._capture.estimate_pool_bytes()

    def close(self) -> None:
        """Drop every graph this runner captured and let go of its pool; the runner can capture again.

        Graph memory goes back to the device once nothing else holds the pool (a runner sharing it keeps it).
        Outputs handed out before are views into that memory: do not read them after closing.
        """
        self._capture.release()

    # --- run ---------------------------------------------------------------------------------------------

    def can_run(self, batch: Mapping[str, torch.Tensor] | int) -> bool:
        """Whether a live batch (or a row count) runs on captured graphs rather than eagerly. An empty batch
        is an idle rank's step: it runs on graphs only with a consensus group (padded to its peers' bucket)."""
        if isinstance(batch, int) and not isinstance(batch, bool):
            if batch < 0:
                raise ValueError(f"can_run takes a row count of at least 0, got {batch}")
            shape = BatchRows(batch)
        else:
            shape = self.inputs.check(batch, allow_empty=self.consensus.is_group)
        idle_allowed = shape.rows > 0 or self.consensus.is_group
        return self.captures_graphs and self.captured and idle_allowed and self.inputs.fits(shape, self.buckets.max_size)

    def claim_current_thread(self) -> None:
        """Make the calling thread the one that runs this runner and every runner sharing its pool.

        Only one thread may run them (see ``runners.thread_owner``); the first ``run`` claims them. Call this
        when a server moves its model loop to another thread; the thread that ran them before must stop.
        """
        self._capture.thread_owner.claim()

    def run(self, batch: Mapping[str, torch.Tensor]) -> Any:
        """Run the forward for a live batch: replay its bucket's graphs, or run eagerly.

        Graph outputs are views into the graph pool, valid until the next ``run`` of this runner (or of any
        runner sharing its pool); ``submit`` hands back outputs the caller keeps. A batch over the phase
        maximum runs eagerly, or raises when eager fallback is off. Only one thread runs a runner
        (``claim_current_thread``). Any slot may be passed as a host (CPU) tensor: the runner copies it into its
        device buffer (from a page-locked one without the host waiting for the device's queue).

        With a consensus group, every rank takes part in the agreement whatever went wrong here first (a
        refused batch, a moved tensor, a wrong thread): a rank that left without it would pair its peers'
        next agreement, and their collectives, with its own next step. A failure on any rank is an error on
        every rank. Without one, the same path raises this rank's error as it is.
        """
        return self._step(batch)[0]

    def submit(self, batch: Mapping[str, torch.Tensor], *, keep: Sequence[str] | None = None) -> StepHandle:
        """Queue a step and return at once, with a handle on its outputs (``runners.step_handle``).

        The step is ``run``'s; its outputs are then copied out of the graph pool on the device, so the caller
        keeps them across any number of later steps, and an event is recorded after the copies. Nothing here
        waits for the device: feed ``handle.outputs`` into the next step's batch as device tensors, read them on
        the host through ``handle.to_host()`` a step later, or ``handle.wait()``.

        keep: for a forward returning a dict, the outputs to hand back (sampled tokens, say, without the
              vocabulary-wide logits): only those are copied. Default: every output.
        """
        self._kept.check(keep)
        outputs, in_pool = self._step(batch)
        outputs = self._kept.select(outputs, keep)
        if in_pool:
            outputs = map_tensors(torch.clone, outputs)
        return StepHandle(outputs, self.device)

    def _step(self, batch: Mapping[str, torch.Tensor]) -> tuple[Any, bool]:
        """``run``'s step; its outputs, and whether they are graph pool memory (a replay's, not an eager run's)."""
        shape, misfit, error = BatchRows(0), None, None
        try:
            self._capture.thread_owner.check(f"this {self.phase} runner")
            shape = self.inputs.check(batch, allow_empty=self.consensus.is_group)
            if self.captures_graphs and not self.captured:
                raise RunnerStateError("call capture() before run() (or use mode 'disabled' to run eagerly)")
            if not self.inputs.fits(shape, self.buckets.max_size):
                misfit = self.inputs.describe_misfit(shape, self.buckets.max_size, self.config.size_field)
            elif self.captures_graphs and self.consensus.is_group:
                # Before the agreement: a rank failing after it would leave its peers inside a collective.
                self._address_watch.check(f"the {self.phase} graphs")
        except Exception as exc:
            error = exc
        largest, misfits = self.consensus.agree_on_batch(shape.rows, misfit is None, error)
        dispatch = self._dispatcher.decide(largest, misfits, misfit, self.counters)
        self.counters.dispatched(dispatch, shape.rows)
        if dispatch.key is None:
            return self._run_eagerly(batch, shape, dispatch), False
        return self._replay(batch, shape, dispatch.key), True

    def _replay(self, batch: Mapping[str, torch.Tensor], shape: BatchRows, bucket: int) -> Any:
        step = self._capture.graphs[bucket]
        if not self.consensus.is_group and (self._check_every_replay or not step.addresses_checked):
            self.counters.timed_check(self._address_watch.check, f"the {self.phase} graph for bucket {bucket}")
            step.addresses_checked = True
        if torch.is_inference_mode_enabled() == self._capture.inference_mode:
            outputs = self._load_and_replay(step, batch, shape, bucket)
        else:
            with torch.inference_mode(self._capture.inference_mode):
                outputs = self._load_and_replay(step, batch, shape, bucket)
        if step.outputs_static:  # a graph: it wrote into the outputs captured
            return self.debug.handed_out(step.outputs.live_rows(shape.rows, shape.requests))
        replayed = GraphOutputs(outputs, bucket, self.request_outputs, self.inputs.max_requests)
        step.outputs_static = replayed.same_tensors(step.outputs)
        return self.debug.handed_out(replayed.live_rows(shape.rows, shape.requests))

    def _load_and_replay(self, step: CapturedStep, batch: Mapping[str, torch.Tensor], shape: BatchRows, bucket: int) -> Any:
        # No torch.no_grad() needed around the copies: an input that requires grad was refused by the check.
        self.inputs.load(batch, shape, bucket)
        self.debug.before_replay()  # after the copy in: a batch may hold the last step's outputs
        if not self.device.needs_graph_update:
            return step.captured.run()
        if step.graph is not None:
            self.device.update(step.graph, self.inputs.graph_update(batch, shape, bucket))
        # One step: eager attention between pieces or segments reads its host lengths once, not once per layer.
        with hal.step_host_values():
            return step.captured.run()

    def _run_eagerly(self, batch: Mapping[str, torch.Tensor], shape: BatchRows, dispatch: Dispatch) -> Any:
        """Eagerly; padded to the largest batch across ranks when that is larger than this rank's, so that
        collectives inside the forward see the same shapes on every rank (an idle rank runs padded rows
        only); the live rows come back."""
        device = self.device.torch_device
        if dispatch.rows > shape.rows:
            outputs = self._forward(self.inputs.padded_to(batch, shape, dispatch.rows, device))
            return GraphOutputs(outputs, dispatch.rows, self.request_outputs, shape.requests).live_rows(shape.rows, shape.requests)
        return self._forward(batch)

    def _forward(self, batch: Mapping[str, torch.Tensor]) -> Any:
        device = self.device.torch_device
        # The forward sees every slot on the device, as it does in a graph, whatever the server passed.
        inputs = {name: value if value.device == device else value.to(device, non_blocking=True) for name, value in batch.items()}
        with torch.no_grad(), hal.step_host_values():  # host lengths (npu attention) read once per step, not per layer
            return self.forward(**inputs)
