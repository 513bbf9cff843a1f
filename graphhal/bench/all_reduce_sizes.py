"""What one all-reduce costs per message size across the bench's tensor-parallel ranks, by path.

Paths: ``torch.distributed`` (NCCL on GPUs, gloo on the cpu), and the device's own all-reduce
(``hal_all_reducer``) with its crossover forced each way where it has one (the cuda plugin's symmetric-memory
kernels: ``one-shot`` for every size it takes, ``two-shot`` for every size it takes). Each path gets a process
group of its own, so that the device is asked afresh under the settings of that path. The table is where the
cuda plugin's limits (``devices/cuda/symmetric_all_reduce.py``) should come from: per size, the fastest path.

On CUDA, each measurement replays a CUDA graph of ``CALLS_PER_GRAPH`` all-reduces (what a step's graph pays,
without launch overhead); elsewhere the calls run eagerly. Every rank runs the same calls in the same order.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

import hal

SIZES = tuple(2**k for k in range(11, 27))  # 2 KiB .. 64 MiB
CALLS_PER_GRAPH = 20
REPLAYS = 10
# path -> the environment the device's all-reducer is asked under (the cuda plugin reads these)
PATH_SETTINGS: dict[str, dict[str, str]] = {
    "torch.distributed": {"GRAPHHAL_SYMM_MEM": "0"},
    "one-shot": {"GRAPHHAL_SYMM_MEM": "1", "GRAPHHAL_SYMM_MEM_ONE_SHOT_MAX_BYTES": str(SIZES[-1])},
    "two-shot": {"GRAPHHAL_SYMM_MEM": "1", "GRAPHHAL_SYMM_MEM_ONE_SHOT_MAX_BYTES": "0"},
}


def sizes_for(device: hal.Device) -> tuple[int, ...]:
    """Every size on an accelerator; up to 256 KiB on the cpu (gloo on shared cores: larger ones take minutes)."""
    return SIZES if device.type != "cpu" else SIZES[:8]


@dataclass(frozen=True)
class AllReduceCost:
    path: str
    nbytes: int
    microseconds: float | None  # None: the path declined this message (or the device has no such path)


def measure(device: hal.Device, ranks: list[int], dtype: torch.dtype, sizes: tuple[int, ...] = SIZES) -> list[AllReduceCost]:
    """Every path at every size, on this rank (collective: every rank of ``ranks`` calls it alike)."""
    costs: list[AllReduceCost] = []
    for path, settings in PATH_SETTINGS.items():
        saved = {name: os.environ.get(name) for name in settings}
        os.environ.update(settings)
        try:
            group = dist.new_group(ranks)  # a group of its own: the device is asked under these settings
            reducer = device.all_reducer(group)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        if path != "torch.distributed" and reducer is None:
            continue  # the device has no all-reduce of its own (or not here): nothing to compare
        for nbytes in sizes:
            partial = torch.ones(nbytes // torch.tensor([], dtype=dtype).element_size(), dtype=dtype, device=device.torch_device)
            call = _call(path, partial, group, reducer)
            costs.append(AllReduceCost(path, nbytes, None if call is None else _microseconds(device, call)))
        dist.destroy_process_group(group)
    return costs


def _call(path: str, partial: torch.Tensor, group: Any, reducer: Any) -> Callable[[], Any] | None:
    if path == "torch.distributed":
        def summed() -> torch.Tensor:
            out = partial.clone()
            dist.all_reduce(out, group=group)
            return out

        return summed
    if reducer.reduce(partial) is None:  # declined: too large, or a dtype it does not serve
        return None
    return lambda: reducer.reduce(partial)


def _microseconds(device: hal.Device, call: Callable[[], Any]) -> float:
    """Microseconds per call: a CUDA graph of CALLS_PER_GRAPH calls replayed REPLAYS times on CUDA, else eager."""
    for _ in range(3):
        call()
    device.synchronize()
    if device.torch_device.type == "cuda":
        stream = torch.cuda.Stream(device.torch_device)
        stream.wait_stream(torch.cuda.current_stream(device.torch_device))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            for _ in range(CALLS_PER_GRAPH):
                call()
        graph.replay()
        device.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(REPLAYS):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1000 / (REPLAYS * CALLS_PER_GRAPH)
    started = time.perf_counter()
    for _ in range(REPLAYS * CALLS_PER_GRAPH):
        call()
    device.synchronize()
    return (time.perf_counter() - started) * 1e6 / (REPLAYS * CALLS_PER_GRAPH)


def fastest_by_size(costs: list[AllReduceCost]) -> dict[int, str]:
    """Per size, the path with the lowest time (the crossovers: where the winner changes)."""
    best: dict[int, AllReduceCost] = {}
    for cost in costs:
        if cost.microseconds is not None and (cost.nbytes not in best or cost.microseconds < best[cost.nbytes].microseconds):  # type: ignore[operator]
            best[cost.nbytes] = cost
    return {nbytes: cost.path for nbytes, cost in sorted(best.items())}


def render(costs: list[AllReduceCost], world_size: int, dtype: str, device_type: str) -> str:
    paths = list(dict.fromkeys(cost.path for cost in costs))
    table = {(cost.path, cost.nbytes): cost.microseconds for cost in costs}
    how = f"a CUDA graph of {CALLS_PER_GRAPH} calls, replayed" if device_type == "cuda" else "eager calls"
    lines = [
        f"one all-reduce across {world_size} ranks, {dtype}, us per call ({how}; '-': the path declines that size):",
        f"{'size':>9}  " + "  ".join(f"{path:>17}" for path in paths) + "  fastest",
    ]
    fastest = fastest_by_size(costs)
    for nbytes in sorted({cost.nbytes for cost in costs}):
        cells = [table.get((path, nbytes)) for path in paths]
        shown = "  ".join(f"{'-' if value is None else f'{value:.1f}':>17}" for value in cells)
        lines.append(f"{_size(nbytes):>9}  {shown}  {fastest.get(nbytes, '-')}")
    return "\n".join(lines)


def _size(nbytes: int) -> str:
    return f"{nbytes >> 20} MiB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KiB"
