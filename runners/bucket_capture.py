"""How a runner captures one bucket, per mode: one object decides, the runner's loop trusts it.

``GraphCapture`` (full, breakable): one device graph per bucket around the forward (``GraphPerKey``),
compiled once first with ``compiler: inductor``. ``PiecewiseCapture``: the forward compiled once with the
piecewise backend, split at the splitting ops that cannot be captured in the runner's batches
(``runners.mode_choice.ops_to_split``); calling it at a bucket captures its pieces (each through
``GraphPerKey``), calling it again replays them.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

import hal
from hal.compile import CompiledForward, CompileStore, InductorBackend
from hal.graph_per_key import AfterWarmup, GraphPerKey
from hal.graph_support import refusing_uncapturable_ops
from hal.piecewise import PiecewiseBackend
from hal.pool_aliases import non_owning_outputs
from runners.compile_cache import CompileCache
from runners.config import PhaseConfig
from runners.graph_outputs import GraphOutputs
from runners.mode_choice import ops_to_split

BREAKABLE_DEBUG_ENV = "GRAPHHAL_BREAKABLE_DEBUG"


@dataclass
class CapturedBucket:
    run: Callable[[], Any]  # replays the bucket; piecewise returns the forward's outputs, a graph None
    graph: Any  # the device graph to update before replays, or None when nothing captured bakes host values
    outputs: Any  # the outputs as captured (non-owning aliases for a graph: see hal.pool_aliases)


@dataclass
class CapturedStep:
    """One bucket's captured step, as the run path replays it."""

    captured: CapturedBucket
    outputs: GraphOutputs  # the outputs as captured
    # Whether every replay hands back the captured output tensors. True for one device graph; a piecewise
    # forward returns what its last piece returns, checked on the first replay.
    outputs_static: bool
    addresses_checked: bool = False  # with check_addresses "first_replay": whether this bucket was checked

    @property
    def graph(self) -> Any:
        return self.captured.graph


class BucketCapture:
    """What a runner's capture loop calls, per mode: ``prepare`` once into a pool, ``capture`` per bucket
    (largest first), ``drop`` after a failure so the next ``prepare`` starts afresh."""

    def __init__(
        self,
        forward: Callable[..., Any],
        device: "hal.Device",
        config: PhaseConfig,
        token_inputs: Sequence[str],
        after_warmup: "AfterWarmup | None" = None,
        batch: "hal.BatchKind" = hal.BatchKind.MIXED,
    ) -> None:
        self.batch = batch  # what the runner's batches look like: piecewise splits only where they need it
        self.device = device
        self.config = config
        self.plain_forward = forward
        self.token_inputs = tuple(token_inputs)  # the slots whose first dimension is the bucket
        self.after_warmup = after_warmup  # across ranks: where they agree that all warmed up (GraphPerKey)

    def prepare(self, pool: Any) -> None:
        raise NotImplementedError

    def capture(self, bucket: int, inputs: Mapping[str, torch.Tensor]) -> CapturedBucket:
        raise NotImplementedError

    def drop(self) -> None:
        """Let go of every graph and of the pool (after a failed capture, or when the runner closes)."""
        raise NotImplementedError


class GraphCapture(BucketCapture):
    """Modes ``full`` and ``breakable``: the whole forward as one device graph per bucket."""

    graphs: GraphPerKey | None = None

    def prepare(self, pool: Any) -> None:
        forward = self.plain_forward
        if self.config.compiler == hal.Compiler.INDUCTOR:
            forward = CompiledForward(forward, self._compile_backend(pool), self.token_inputs, store=self._store())
        if self.config.mode == hal.GraphMode.BREAKABLE and breakable_debug(self.config):
            # The whole forward as one eager step through the same capture and replay path.
            forward = hal.break_point(forward, name="the whole forward (breakable debug mode)")
        self.forward = forward
        # The runner keeps only aliases of the outputs: free for the next (smaller) bucket's capture to reuse.
        self.graphs = GraphPerKey(
            self.device,
            pool,
            mode=self.config.mode,
            warmup_runs=self.config.warmup_runs,
            outputs_leave=True,
            after_warmup=self.after_warmup,
        )

    def _compile_backend(self, pool: Any) -> Any:
        if self.config.mode == hal.GraphMode.BREAKABLE:
            # Inductor per piece, and the splitting ops (attention) as the breaks between segments.
            return PiecewiseBackend(
                self.device, pool, (), compiler=hal.Compiler.INDUCTOR, splitting_ops_as_break_points=True
            )
        return InductorBackend()

    def _store(self) -> CompileStore | None:
        """Where a compile is kept for the next process: beside the compile caches, when there are any.
        (Only Inductor's whole-forward compile is stored; breakable's split one compiles every time.) None where
        the directory could not be used (``CompileCache.activate`` said why)."""
        if self.config.compile_cache_dir is None:
            return None
        cache = CompileCache(self.config.compile_cache_dir)
        return cache.forwards if cache.active else None

    def capture(self, bucket: int, inputs: Mapping[str, torch.Tensor]) -> CapturedBucket:
        assert self.graphs is not None, "prepare() first"
        # A declared op that cannot be captured in these batches, reached inside the capture (one chosen at this
        # bucket's batch size, say), fails it as a required break point would. Not around a compiled forward:
        # under a torch function mode, Dynamo would run the frame eagerly instead of the compiled code.
        guard = contextlib.nullcontext()
        if self.config.compiler == hal.Compiler.NONE:
            guard = refusing_uncapturable_ops(self.device.torch_device.type, self.batch)
        with guard:
            captured = self.graphs.capture(bucket, self.forward, **inputs)
        return CapturedBucket(captured.replay, captured.graph, captured.outputs)

    def drop(self) -> None:
        if self.graphs is not None:
            self.graphs.drop()
        self.graphs = None  # the next capture() prepares again: a new pool and, with inductor, a new compile


class PiecewiseCapture(BucketCapture):
    """Mode ``piecewise``: pieces between splitting ops captured per bucket by ``PiecewiseBackend``."""

    backend: PiecewiseBackend | None = None
    forward: Any = None

    def prepare(self, pool: Any) -> None:
        assert self.config.buckets is not None and self.config.compiler is not None
        self.backend = PiecewiseBackend(
            self.device,
            pool,
            self.config.buckets,
            compiler=self.config.compiler,
            warmup_runs=self.config.warmup_runs,
            splitting_ops=ops_to_split(self.device, self.batch),
            after_warmup=self.after_warmup,
        )
        self.forward = CompiledForward(self.plain_forward, self.backend, self.token_inputs)

    def capture(self, bucket: int, inputs: Mapping[str, torch.Tensor]) -> CapturedBucket:
        forward = self.forward
        outputs = forward(**inputs)  # compiles on the first (largest) bucket, then captures every piece
        # Captured whole: its pieces' outputs (and the forward's) may now share memory with the next bucket's.
        self.backend.let_outputs_leave(bucket)
        outputs = non_owning_outputs(outputs)

        def run() -> Any:
            with torch.no_grad():  # as at capture: the compiled code is guarded on the grad mode
                return forward(**inputs)

        return CapturedBucket(run, None, outputs)

    def drop(self) -> None:
        if self.backend is not None:
            self.backend.release()  # torch.compile keeps the backend itself alive: empty it
        self.backend = self.forward = None  # the next capture() prepares a new backend, pool and compile


def bucket_capture(
    forward: Callable[..., Any],
    device: "hal.Device",
    config: PhaseConfig,
    token_inputs: Sequence[str],
    after_warmup: "AfterWarmup | None" = None,
    batch: "hal.BatchKind" = hal.BatchKind.MIXED,
) -> BucketCapture:
    kind = PiecewiseCapture if config.mode == hal.GraphMode.PIECEWISE else GraphCapture
    return kind(forward, device, config, token_inputs, after_warmup, batch)


def breakable_debug(config: PhaseConfig) -> bool:
    """Whether breakable debug mode is on: the config field, or GRAPHHAL_BREAKABLE_DEBUG in this process."""
    return config.breakable_debug or os.environ.get(BREAKABLE_DEBUG_ENV, "") not in ("", "0")
