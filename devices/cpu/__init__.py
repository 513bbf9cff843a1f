"""The cpu device: graphhal's reference device, available everywhere, and what CI tests on.

Its graphs are ``RecordedGraph``s: capture records the aten ops the forward issues and replay re-issues them
on the captured tensors with host values baked in, so a forward that would break under a CUDA graph breaks
here too (see ``recorded_graph``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch

from devices.cpu import device_memory
from devices.cpu.recorded_graph import RecordedGraph, RecordingPool
from hal import Compiler, DeviceId, GraphMode, MemoryStats, hookimpl

DEVICE_TYPE = "cpu"
GRAPH_MODES = (GraphMode.FULL.value,)


@hookimpl
def hal_device_types() -> list[str]:
    return [DEVICE_TYPE]


@hookimpl
def hal_is_available(device: DeviceId) -> bool:
    return device.index in (None, 0)  # torch has one cpu device


@hookimpl
def hal_graph_modes(device: DeviceId) -> tuple[str, ...]:
    return GRAPH_MODES


@hookimpl
def hal_torch_device(device: DeviceId) -> torch.device:
    return torch.device("cpu")


@hookimpl
def hal_make_graph(device: DeviceId, mode: str) -> RecordedGraph:
    return RecordedGraph(str(device))


@hookimpl
def hal_capture_session(graph: RecordedGraph, pool: Any, stream: Any) -> AbstractContextManager[Any]:
    return graph.record(pool)


@hookimpl
def hal_replay(graph: RecordedGraph) -> None:
    graph.replay()


@hookimpl
def hal_capture_executes_work(device: DeviceId) -> bool:
    return True  # the recorder runs each op as it records it


@hookimpl
def hal_compiled_capture_problem(device: DeviceId, mode: str, compiler: str) -> str | None:
    if compiler != Compiler.INDUCTOR:
        return None
    instead = Compiler.EAGER if mode == GraphMode.PIECEWISE else Compiler.NONE
    return (
        "the cpu device records the torch ops a forward issues, and Inductor's fused C++ kernels run without "
        f"passing torch's dispatcher, so a recorded graph would replay without them; use compiler '{instead}'"
    )


@hookimpl
def hal_graph_pool(device: DeviceId) -> RecordingPool:
    return RecordingPool()


@hookimpl
def hal_synchronize(device: DeviceId) -> None:
    pass  # cpu ops complete before they return


@hookimpl
def hal_distributed_backend(device: DeviceId) -> str:
    return "gloo"


@hookimpl
def hal_memory_stats(device: DeviceId, pool: Any) -> MemoryStats:
    pool_bytes = pool.bytes if isinstance(pool, RecordingPool) else None
    free, total = device_memory.mem_get_info()  # the model of a card's memory (devices.cpu.device_memory)
    return MemoryStats(pool_bytes=pool_bytes, device_free_bytes=free, device_total_bytes=total)
