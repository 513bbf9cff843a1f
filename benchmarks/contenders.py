"""The decode contenders: eager, graphhal's runner modes, a hand-written floor and torch.compile's peer.

Each contender turns (the bench model, one live batch) into a ``Prepared`` step: a zero-argument callable
running one decode step on that batch, plus what it cost to set up. Every contender is set up from scratch
per batch size, so its setup time and pool memory belong to that size alone:

- ``eager``: the model's step, called directly.
- ``full`` / ``breakable`` / ``piecewise``: a ``DecodeRunner`` in that mode with one bucket, the batch size
  (no padding, so the comparison with the floor is like for like). ``piecewise`` runs only where the device
  offers it.
- ``full+inductor``: ``DecodeRunner`` with ``DecodeConfig(compiler="inductor")``: the forward compiled once
  by torch.compile with a dynamic batch dim and no Inductor cudagraphs, then captured by graphhal. Only on
  devices whose graphs capture compiled kernels (CUDA; the cpu device's graphs record torch ops).
- ``floor``: no graphhal in between. On CUDA, static input tensors, a warm-up on a side stream, a
  ``torch.cuda.CUDAGraph`` captured in its own pool, and per step the same input copy the runner does then
  ``replay()``. Elsewhere the same idea through the device's own graph (``Device.make_graph`` /
  ``capture_session`` / ``replayer``): the least any runner could cost on that device.
- ``reduce-overhead``: ``torch.compile(mode="reduce-overhead")`` on the same step, set up the way a fair
  user would: the KV cache tensors and per-size static input buffers marked static (otherwise cudagraph trees
  copy every input per step, or skip graphs for the mutated cache), inputs copied into those buffers per step
  as a server would, ``torch.compiler.cudagraph_mark_step_begin()`` before each step. The batch dim is
  dynamic, as torch.compile makes it anyway once a server has run two batch sizes: the same Inductor kernels
  as ``full+inductor``, so the two differ only in who manages the graphs. Its setup is compile + warm-up +
  recording. CUDA only.

Contenders of one size are alive together (they are timed interleaved), so nothing here resets torch.compile
state while one may still call its compiled code; ``release_memory`` resets it between sizes. So each size's
compiled contenders compile afresh (Inductor's on-disk caches still make later sizes faster), and per-size
recompiles never reach dynamo's recompile limit, past which it silently runs eagerly.
"""

from __future__ import annotations

import gc
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

import hal
from benchmarks.names import EAGER, FLOOR, FULL_INDUCTOR, REDUCE_OVERHEAD
from benchmarks.workload import BenchModel
from runners import DecodeConfig, DecodeRunner

RUNNER_MODES = ("full", "breakable", "piecewise")
# Every decode contender a user may name, in table order; eager always runs (it is the baseline).
DECODE_CONTENDERS = (FLOOR, *RUNNER_MODES, FULL_INDUCTOR, REDUCE_OVERHEAD)

Batch = Mapping[str, torch.Tensor]


@dataclass
class Prepared:
    """One contender set up for one batch: ``run()`` does a step and returns its outputs."""

    run: Callable[[], Any]
    setup_s: float | None = None  # compile + warm-up + capture; None for eager
    pool_bytes: int | None = None  # graph memory pool after setup; None when there is none or it is unknown


class DecodeContender(ABC):
    name: str
    detail: str = ""  # what exactly runs, for the table's notes and the JSON

    def skip_reason(self, device: hal.Device) -> str | None:
        """Why this contender cannot run on ``device`` (or with this graphhal), or None when it can."""
        return None

    @abstractmethod
    def prepare(self, bench: BenchModel, batch: Batch) -> Prepared: ...


def release_memory(device: hal.Device) -> None:
    """Free what finished contenders held, so the next ones' pool measurements start clean.

    Also forgets every torch.compile result and cudagraph tree: call it only once nothing set up before it
    will run again.
    """
    torch._dynamo.reset()
    if device.torch_device.type == "cuda":
        # Graphs and their pools can sit in reference cycles; only a collection returns their memory to the
        # allocator. Elsewhere it is skipped: with torch loaded one collection takes ~0.25 s on a small CPU,
        # and pool sizes there are counted per pool, not read from an allocator.
        gc.collect()
        torch.cuda.empty_cache()


def static_copy(batch: Batch) -> dict[str, torch.Tensor]:
    """Static input buffers for one batch size, holding that batch (contiguous, as the runner's are)."""
    return {name: tensor.clone(memory_format=torch.contiguous_format) for name, tensor in batch.items()}


def load_into(static: dict[str, torch.Tensor], batch: Batch) -> None:
    """The per-step input copy of a server (and of ``StaticInputs.load`` for a batch that fills its bucket)."""
    for name, tensor in batch.items():
        static[name].copy_(tensor, non_blocking=True)


class Eager(DecodeContender):
    name = EAGER
    detail = "the model's decode step called directly"

    def prepare(self, bench: BenchModel, batch: Batch) -> Prepared:
        step = bench.decode_step
        return Prepared(run=lambda: step(**batch))


class RunnerMode(DecodeContender):
    """graphhal's ``DecodeRunner`` in one mode, optionally with a compiler, one bucket per batch size."""

    def __init__(self, mode: str, compiler: str | None = None) -> None:
        self.mode = mode
        self.compiler = compiler
        self.name = mode if compiler is None else f"{mode}+{compiler}"
        self.detail = f"DecodeRunner(mode={mode!r}" + (f", compiler={compiler!r})" if compiler else ")")

    def skip_reason(self, device: hal.Device) -> str | None:
        if self.mode not in device.modes:
            return f"device {device} does not offer mode {self.mode!r} (its modes: {', '.join(device.modes)})"
        try:  # the config knows which devices can capture compiled kernels; ask it rather than guess
            DecodeConfig(mode=self.mode, compiler=self.compiler, max_bs=1).check_device(device)
        except (ValueError, hal.GraphHalError) as exc:
            return str(exc)
        return None

    def prepare(self, bench: BenchModel, batch: Batch) -> Prepared:
        config = DecodeConfig(mode=self.mode, buckets=[_rows(batch)], compiler=self.compiler, show_progress=False)
        started = time.perf_counter()
        runner = DecodeRunner(bench.decode_step, bench.decode_slots, bench.device, config)
        report = runner.capture()
        bench.device.synchronize()
        return Prepared(run=lambda: runner.run(batch), setup_s=time.perf_counter() - started, pool_bytes=report.pool_bytes)


class HandWrittenFloor(DecodeContender):
    name = FLOOR

    def __init__(self, device: hal.Device) -> None:
        self.on_cuda = device.torch_device.type == "cuda"
        self.detail = (
            "torch.cuda.CUDAGraph replayed directly, no graphhal"
            if self.on_cuda
            else f"the {device.type} device's own graph replayed through its plugin, no runner"
        )

    def skip_reason(self, device: hal.Device) -> str | None:
        if "full" not in device.graph_modes:
            return f"device {device} has no full graphs to hand-write a floor with"
        return None

    def prepare(self, bench: BenchModel, batch: Batch) -> Prepared:
        return self._cuda(bench, batch) if self.on_cuda else self._device_graph(bench, batch)

    @staticmethod
    def _cuda(bench: BenchModel, batch: Batch) -> Prepared:
        step, torch_device = bench.decode_step, bench.device.torch_device
        started = time.perf_counter()
        static = static_copy(batch)
        # Warm up on a side stream, as torch.cuda.graphs asks: lazy init and Triton autotuning must not
        # happen inside the capture, and the side stream keeps the warm-up's allocations out of the pool.
        side = torch.cuda.Stream(torch_device)
        side.wait_stream(torch.cuda.current_stream(torch_device))
        with torch.cuda.stream(side):
            step(**static)
        torch.cuda.current_stream(torch_device).wait_stream(side)
        torch.cuda.synchronize(torch_device)
        pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs = step(**static)
        torch.cuda.synchronize(torch_device)
        setup_s = time.perf_counter() - started

        def run() -> Any:
            load_into(static, batch)
            graph.replay()
            return outputs

        return Prepared(run=run, setup_s=setup_s, pool_bytes=bench.device.memory_stats(pool).pool_bytes)

    @staticmethod
    def _device_graph(bench: BenchModel, batch: Batch) -> Prepared:
        step, device = bench.decode_step, bench.device
        started = time.perf_counter()
        static = static_copy(batch)
        step(**static)
        device.synchronize()
        pool = device.graph_pool()
        graph = device.make_graph("full")
        with device.capture_session(graph, pool):
            outputs = step(**static)
        replay = device.replayer(graph)
        device.synchronize()
        setup_s = time.perf_counter() - started

        def run() -> Any:
            load_into(static, batch)
            replay()
            return outputs

        return Prepared(run=run, setup_s=setup_s, pool_bytes=device.memory_stats(pool).pool_bytes)


class ReduceOverhead(DecodeContender):
    name = REDUCE_OVERHEAD
    detail = 'torch.compile(mode="reduce-overhead"), dynamic batch dim, static KV cache and input buffers'
    SETUP_CALLS = 3  # calls until cudagraph trees replay: see reduce_overhead_setup_calls

    def skip_reason(self, device: hal.Device) -> str | None:
        if device.torch_device.type != "cuda":
            return "n/a: reduce-overhead records CUDA graphs (CUDA only)"
        return None

    def prepare(self, bench: BenchModel, batch: Batch) -> Prepared:
        torch_device = bench.device.torch_device
        before = private_pool_bytes(torch_device)
        started = time.perf_counter()
        static = static_copy(batch)
        mark_for_reduce_overhead(bench, static)
        compiled = torch.compile(bench.decode_step, mode="reduce-overhead")
        reduce_overhead_setup_calls(compiled, static, torch_device)
        setup_s = time.perf_counter() - started

        def run() -> Any:
            load_into(static, batch)
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs may be overwritten now
            return compiled(**static)

        return Prepared(run=run, setup_s=setup_s, pool_bytes=private_pool_bytes(torch_device) - before)


def mark_for_reduce_overhead(bench: BenchModel, static: dict[str, torch.Tensor], *, dynamic_batch: bool = True) -> None:
    """Mark the KV cache and one size's static input buffers the way a fair reduce-overhead user would.

    Static addresses: cudagraph trees then neither copy these inputs per step nor refuse to record a graph
    that mutates one (the cache is written every step). ``dynamic_batch``: the batch dim marked dynamic, so
    one compile serves every batch size (as torch.compile makes it anyway once a server has run two sizes).
    """
    for tensor in [*bench.kv_cache.key_caches, *bench.kv_cache.value_caches, *static.values()]:
        torch._dynamo.mark_static_address(tensor)
    if dynamic_batch:
        for tensor in static.values():
            # "maybe": a batch of 1 is specialised by dynamo whatever we ask, and must not raise for it.
            torch._dynamo.maybe_mark_dynamic(tensor, 0)


def reduce_overhead_setup_calls(compiled: Callable[..., Any], static: dict[str, torch.Tensor], torch_device: torch.device) -> None:
    """The calls a reduce-overhead step needs at a new batch size before it replays a CUDA graph.

    The first runs the compiled code eagerly (warm-up; it compiles first where nothing compiled fits), the
    second records, the third is the first replay: all three are setup. Raises when Inductor declined CUDA
    graphs: it only logs a warning and runs without them, and timing that as "reduce-overhead" would compare
    graphhal with eager Inductor kernels under the peer's name.
    """
    skips = _cudagraph_skips()
    for _ in range(ReduceOverhead.SETUP_CALLS):
        torch.compiler.cudagraph_mark_step_begin()
        compiled(**static)
    torch.cuda.synchronize(torch_device)
    if _cudagraph_skips() > skips:
        raise RuntimeError("torch.compile skipped CUDA graphs for the step (its warning above says why)")


def _cudagraph_skips() -> int:
    """How often Inductor has declined to use CUDA graphs in this process (its own counter)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def private_pool_bytes(torch_device: torch.device) -> int:
    """Bytes in CUDA graph pools on ``torch_device``: segments of a pool other than the default (0, 0).

    cudagraph trees keep their pool to themselves, so the reduce-overhead contender's pool is measured as
    the growth of this total across its setup (earlier contenders' pools are freed by then).
    """
    index = torch_device.index if torch_device.index is not None else torch.cuda.current_device()
    return sum(
        segment["total_size"]
        for segment in torch.cuda.memory_snapshot()
        if segment["device"] == index and tuple(segment.get("segment_pool_id", (0, 0))) != (0, 0)
    )


def _rows(batch: Batch) -> int:
    return next(iter(batch.values())).shape[0]


def decode_contenders(names: list[str], device: hal.Device) -> list[DecodeContender]:
    """The named contenders, in table order, after eager."""
    by_name: dict[str, Callable[[], DecodeContender]] = {
        FLOOR: lambda: HandWrittenFloor(device),
        **{mode: (lambda mode=mode: RunnerMode(mode)) for mode in RUNNER_MODES},
        FULL_INDUCTOR: lambda: RunnerMode("full", compiler="inductor"),
        REDUCE_OVERHEAD: ReduceOverhead,
    }
    unknown = sorted(set(names) - by_name.keys())
    if unknown:
        raise ValueError(f"unknown decode mode(s) {', '.join(unknown)}; known: {', '.join(DECODE_CONTENDERS)}")
    return [Eager(), *(by_name[name]() for name in DECODE_CONTENDERS if name in names)]
