"""How a runner captures one bucket, per mode: one object decides, the runner's loop trusts it.

``GraphCapture`` (full, breakable): one device graph per bucket around the forward, compiled once first
with ``compiler: inductor``. ``PiecewiseCapture``: the forward compiled once with the piecewise backend;
calling it at a bucket captures its pieces, calling it again replays them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

import hal
from hal.pool_aliases import non_owning_outputs
from runners.config import PhaseConfig


@dataclass
class CapturedBucket:
    run: Callable[[], Any]  # replays the bucket; piecewise returns the forward's outputs, a graph None
    graph: Any  # the device graph to update before replays, or None when nothing captured bakes host values
    outputs: Any  # the outputs as captured (non-owning aliases for a graph: see hal.pool_aliases)


class GraphCapture:
    """Modes ``full`` and ``breakable``: the whole forward as one device graph per bucket."""

    def __init__(self, forward: Callable[..., Any], device: "hal.Device", config: PhaseConfig, token_inputs: Sequence[str]) -> None:
        self.device = device
        self.config = config
        self.forward = forward
        self.token_inputs = tuple(token_inputs)

    def prepare(self, pool: Any) -> None:
        self.pool = pool
        if self.config.compiler == "inductor":
            self.forward = hal.CompiledForward(self.forward, self._compile_backend(pool), self.token_inputs)

    def _compile_backend(self, pool: Any) -> Any:
        if self.config.mode == hal.BREAKABLE_MODE:
            # Inductor per piece, and the splitting ops (attention) as the breaks between segments.
            return hal.PiecewiseBackend(self.device, pool, (), compiler="inductor", capture=False)
        return hal.InductorBackend()

    def capture(self, bucket: int, inputs: Mapping[str, torch.Tensor]) -> CapturedBucket:
        device, mode = self.device, self.config.mode
        forward = self.forward
        if mode == hal.BREAKABLE_MODE and self.config.breakable_debug:
            forward = hal.break_point(self.forward, name="the whole forward (breakable debug mode)")
        graph = device.make_graph(mode)
        with device.capture_session(graph, self.pool):
            outputs = forward(**inputs)
        # The runner keeps only aliases: the memory is free for the next (smaller) bucket's capture to reuse.
        return CapturedBucket(device.replayer(graph), graph, non_owning_outputs(outputs))

    def warm_up(self, inputs: Mapping[str, torch.Tensor]) -> None:
        for _ in range(self.config.warmup_runs):
            self.forward(**inputs)
        self.device.synchronize()

    def drop(self) -> None:
        pass  # the runner drops its graphs; nothing else holds any


class PiecewiseCapture:
    """Mode ``piecewise``: pieces between splitting ops captured per bucket by ``hal.PiecewiseBackend``."""

    def __init__(self, forward: Callable[..., Any], device: "hal.Device", config: PhaseConfig, token_inputs: Sequence[str]) -> None:
        self.device = device
        self.config = config
        self.plain_forward = forward
        self.token_inputs = tuple(token_inputs)
        self.backend: hal.PiecewiseBackend | None = None
        self.forward: Any = None

    def prepare(self, pool: Any) -> None:
        assert self.config.buckets is not None and self.config.compiler is not None
        self.backend = hal.PiecewiseBackend(
            self.device, pool, self.config.buckets, compiler=self.config.compiler, warmup_runs=self.config.warmup_runs
        )
        self.forward = hal.CompiledForward(self.plain_forward, self.backend, self.token_inputs)

    def warm_up(self, inputs: Mapping[str, torch.Tensor]) -> None:
        pass  # each piece warms up itself right before its capture

    def capture(self, bucket: int, inputs: Mapping[str, torch.Tensor]) -> CapturedBucket:
        forward = self.forward
        outputs = forward(**inputs)  # compiles on the first (largest) bucket, then captures every piece

        def run() -> Any:
            with torch.no_grad():  # as at capture: the compiled code is guarded on the grad mode
                return forward(**inputs)

        return CapturedBucket(run, None, outputs)

    def drop(self) -> None:
        self.backend = self.forward = None  # the next capture() prepares a new backend, pool and compile


def bucket_capture(forward: Callable[..., Any], device: "hal.Device", config: PhaseConfig, token_inputs: Sequence[str]) -> Any:
    if config.mode == hal.PIECEWISE_MODE:
        return PiecewiseCapture(forward, device, config, token_inputs)
    return GraphCapture(forward, device, config, token_inputs)
