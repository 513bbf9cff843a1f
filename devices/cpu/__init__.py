"""The cpu device: graphhal's reference device, available everywhere, and what CI tests on.

Its graphs are ``RecordedGraph``s: capture records the aten ops the forward issues and replay re-issues them
on the captured tensors with host values baked in, so a forward that would break under a CUDA graph breaks
here too (see ``recorded_graph``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch

from devices.cpu.recorded_graph import RecordedGraph, RecordingPool
from hal import DeviceId, GraphMode, MemoryStats, hookimpl

DEVICE_TYPE = "cpu"
GRAPH_MODES = (GraphMode.FULL.value,)


def _mine(device: DeviceId) -> bool:
    return device.type == DEVICE_TYPE


@hookimpl
def hal_device_types() -> list[str]:
    return [DEVICE_TYPE]


@hookimpl
def hal_is_available(device: DeviceId) -> bool | None:
    if not _mine(device):
        return None
    return device.index in (None, 0)  # torch has one cpu device


@hookimpl
def hal_graph_modes(device: DeviceId) -> tuple[str, ...] | None:
    return GRAPH_MODES if _mine(device) else None


@hookimpl
def hal_torch_device(device: DeviceId) -> torch.device | None:
    return torch.device("cpu") if _mine(device) else None


@hookimpl
def hal_make_graph(device: DeviceId, mode: str) -> RecordedGraph | None:
    if not _mine(device) or mode not in GRAPH_MODES:
        return None
    return RecordedGraph()


@hookimpl
def hal_capture_session(graph: Any, pool: Any, stream: Any) -> AbstractContextManager[Any] | None:
    if not isinstance(graph, RecordedGraph):
        return None
    return graph.record(pool)


@hookimpl
def hal_replay(graph: Any) -> bool | None:
    if not isinstance(graph, RecordedGraph):
        return None
    graph.replay()
    return True


@hookimpl
def hal_capture_executes_work(device: DeviceId) -> bool | None:
    return True if _mine(device) else None  # the recorder runs each op as it records it


@hookimpl
def hal_captures_compiled_kernels(device: DeviceId) -> bool | None:
    # The recorder sees torch ops only; Inductor's fused C++ kernels run without passing the dispatcher,
    # so a recorded graph would replay without them.
    return False if _mine(device) else None


@hookimpl
def hal_graph_pool(device: DeviceId) -> RecordingPool | None:
    return RecordingPool() if _mine(device) else None


@hookimpl
def hal_synchronize(device: DeviceId) -> bool | None:
    return True if _mine(device) else None  # cpu ops complete before they return


@hookimpl
def hal_distributed_backend(device: DeviceId) -> str | None:
    return "gloo" if _mine(device) else None


@hookimpl
def hal_memory_stats(device: DeviceId, pool: Any) -> MemoryStats | None:
    if not _mine(device):
        return None
    pool_bytes = pool.bytes if isinstance(pool, RecordingPool) else None
    return MemoryStats(pool_bytes=pool_bytes)
