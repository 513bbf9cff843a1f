"""torch.compile's peer of graphhal: ``torch.compile(mode="reduce-overhead")``, set up the way a fair user would.

The KV cache tensors and per-size static input buffers are marked static (otherwise cudagraph trees copy
every input per step, or skip graphs for the mutated cache), inputs are copied into those buffers per step as
a server would, and ``torch.compiler.cudagraph_mark_step_begin()`` comes before each step. The batch dim is
dynamic, as torch.compile makes it anyway once a server has run two batch sizes: the same Inductor kernels
as ``full+inductor``, so the two differ only in who manages the graphs. Setup at a size is compile + warm-up
+ recording. CUDA only.

The recipe is the functions below, and two measurements follow it: the per-size contender here, and the
compiled setup of every bucket (``graphhal.bench.setup.compiled_setup``), which calls one compiled step at many
sizes.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

import torch

import hal
from graphhal.bench.contenders.contender import Batch, Contender, Prepared
from graphhal.bench.contenders.static_buffers import input_loader, static_copy
from graphhal.bench.names import REDUCE_OVERHEAD
from graphhal.bench.workload import Workload

SETUP_CALLS = 3  # calls until cudagraph trees replay at a new size: see reduce_overhead_setup_calls


def recompile_limit_at_least(limit: int, *, fail_when_hit: bool = False) -> contextlib.AbstractContextManager[Any]:
    """Dynamo's recompile limit raised to ``limit`` for the block (never lowered); ``fail_when_hit``: an error
    instead of a silent eager fallback past it. torch 2.7 renamed ``cache_size_limit`` and
    ``fail_on_cache_limit_hit`` to these names (the old ones stay as aliases); torch 2.6 knows only the old."""
    config = torch._dynamo.config
    renamed = hasattr(config, "recompile_limit")
    name = "recompile_limit" if renamed else "cache_size_limit"
    settings: dict[str, Any] = {name: max(getattr(config, name), limit)}
    if fail_when_hit:
        settings["fail_on_recompile_limit_hit" if renamed else "fail_on_cache_limit_hit"] = True
    return config.patch(**settings)


def compile_reduce_overhead(step: Callable[..., Any], dynamic: bool) -> Callable[..., Any]:
    """The step compiled in mode reduce-overhead: ``dynamic`` None (torch.compile's default) or False."""
    return torch.compile(step, mode="reduce-overhead", dynamic=None if dynamic else False)


def mark_for_reduce_overhead(workload: Workload, static: dict[str, torch.Tensor], *, dynamic_batch: bool = True) -> None:
    """Mark the KV cache and one size's static input buffers the way a fair reduce-overhead user would.

    Static addresses: cudagraph trees then neither copy these inputs per step nor refuse to record a graph
    that mutates one (the cache is written every step). ``dynamic_batch``: the batch dim marked dynamic, so
    one compile serves every batch size (as torch.compile makes it anyway once a server has run two sizes).
    """
    for tensor in [*workload.kv_cache_tensors(), *static.values()]:
        # guard=False, torch 2.10's default: up to torch 2.9 the default guards each tensor's identity, and
        # every size's new buffers would compile the step again.
        torch._dynamo.mark_static_address(tensor, guard=False)
    if dynamic_batch:
        for tensor in static.values():
            # "maybe": a batch of 1 is specialised by dynamo whatever we ask, and must not raise for it.
            torch._dynamo.maybe_mark_dynamic(tensor, 0)


def reduce_overhead_setup_calls(
    compiled: Callable[..., Any], static: dict[str, torch.Tensor], torch_device: torch.device
) -> None:
    """The calls a reduce-overhead step needs at a new batch size before it replays a CUDA graph.

    The first runs the compiled code eagerly (warm-up; it compiles first where nothing compiled fits), the
    second records, the third is the first replay: all three are setup. Raises when Inductor declined CUDA
    graphs: it only logs a warning and runs without them, and timing that as "reduce-overhead" would compare
    graphhal with eager Inductor kernels under the peer's name.
    """
    skips = cudagraph_skips()
    for _ in range(SETUP_CALLS):
        torch.compiler.cudagraph_mark_step_begin()
        compiled(**static)
    torch.cuda.synchronize(torch_device)
    if cudagraph_skips() > skips:
        raise RuntimeError("torch.compile skipped CUDA graphs for the step (its warning above says why)")


def cudagraph_skips() -> int:
    """How often Inductor has declined to use CUDA graphs in this process (its own counter)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def private_pool_bytes(torch_device: torch.device) -> int:
    """Bytes in CUDA graph pools on ``torch_device``: segments of a pool other than the default (0, 0).

    cudagraph trees keep their pool to themselves, so reduce-overhead's pool is measured as the growth of this
    total across its setup (earlier contenders' pools are freed by then).
    """
    index = torch_device.index if torch_device.index is not None else torch.cuda.current_device()
    return sum(
        segment["total_size"]
        for segment in torch.cuda.memory_snapshot()
        if segment["device"] == index and tuple(segment.get("segment_pool_id", (0, 0))) != (0, 0)
    )


class ReduceOverhead(Contender[Batch]):
    """One reduce-overhead compile of the step, set up at one batch size."""

    name = REDUCE_OVERHEAD
    detail = 'torch.compile(mode="reduce-overhead"), dynamic batch dim, static KV cache and input buffers'

    def skip_reason(self, device: hal.Device) -> str | None:
        if device.torch_device.type != "cuda":
            return "n/a: reduce-overhead records CUDA graphs (CUDA only)"
        return None

    def prepare(self, workload: Workload, batch: Batch) -> Prepared:
        torch_device = workload.device.torch_device
        before = private_pool_bytes(torch_device)
        started = time.perf_counter()
        static = static_copy(batch)
        mark_for_reduce_overhead(workload, static)
        compiled = compile_reduce_overhead(workload.decode_step, dynamic=True)
        reduce_overhead_setup_calls(compiled, static, torch_device)
        setup_s = time.perf_counter() - started

        load = input_loader(static)

        def run() -> Any:
            load(batch)
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs may be overwritten now
            return compiled(**static)

        return Prepared(run=run, setup_s=setup_s, pool_bytes=private_pool_bytes(torch_device) - before)
