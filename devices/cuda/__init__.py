"""The cuda device: full graphs on ``torch.cuda.CUDAGraph``, a shared pool, a side capture stream."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch

from devices.cuda.capture_session import CudaCaptureSession
from devices.cuda.triton_key_warmup import start_hashing_triton_key
from hal import DeviceId, GraphMode, MemoryStats, hookimpl

DEVICE_TYPE = "cuda"
GRAPH_MODES = (GraphMode.FULL.value,)

_capture_streams: dict[int, torch.cuda.Stream] = {}


def _mine(device: DeviceId) -> bool:
    return device.type == DEVICE_TYPE


def _index(device: DeviceId) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@hookimpl
def hal_device_types() -> list[str]:
    return [DEVICE_TYPE]


@hookimpl
def hal_is_available(device: DeviceId) -> bool | None:
    if not _mine(device):
        return None
    if not torch.cuda.is_available():
        return False
    return device.index is None or device.index < torch.cuda.device_count()


@hookimpl
def hal_graph_modes(device: DeviceId) -> tuple[str, ...] | None:
    return GRAPH_MODES if _mine(device) else None


@hookimpl
def hal_torch_device(device: DeviceId) -> torch.device | None:
    return torch.device(DEVICE_TYPE, _index(device)) if _mine(device) else None


@hookimpl
def hal_make_graph(device: DeviceId, mode: str) -> torch.cuda.CUDAGraph | None:
    if not _mine(device) or mode not in GRAPH_MODES:
        return None
    return torch.cuda.CUDAGraph()


@hookimpl
def hal_capture_session(graph: Any, pool: Any, stream: Any) -> AbstractContextManager[Any] | None:
    if not isinstance(graph, torch.cuda.CUDAGraph):
        return None
    return CudaCaptureSession(graph, pool, stream)


@hookimpl
def hal_replay(graph: Any) -> bool | None:
    if not isinstance(graph, torch.cuda.CUDAGraph):
        return None
    graph.replay()
    return True


@hookimpl
def hal_graph_pool(device: DeviceId) -> Any:
    if not _mine(device):
        return None
    with torch.cuda.device(_index(device)):
        return torch.cuda.graph_pool_handle()


@hookimpl
def hal_capture_stream(device: DeviceId) -> torch.cuda.Stream | None:
    """One side stream per GPU, shared by every runner: captures never run on the legacy default stream."""
    if not _mine(device):
        return None
    index = _index(device)
    if index not in _capture_streams:
        _capture_streams[index] = torch.cuda.Stream(device=index)
        start_hashing_triton_key()  # the device is being made: overlap Triton's key with the model's loading
    return _capture_streams[index]


@hookimpl
def hal_synchronize(device: DeviceId) -> bool | None:
    if not _mine(device):
        return None
    torch.cuda.synchronize(_index(device))
    return True


@hookimpl
def hal_distributed_backend(device: DeviceId) -> str | None:
    return "nccl" if _mine(device) else None


@hookimpl
def hal_memory_stats(device: DeviceId, pool: Any) -> MemoryStats | None:
    if not _mine(device):
        return None
    index = _index(device)
    pool_bytes = None
    if pool is not None:
        # Segments carry the id of the pool they were allocated for; a graph pool's id is its handle.
        pool_id = tuple(pool) if isinstance(pool, (tuple, list)) else pool
        pool_bytes = sum(
            segment["total_size"]
            for segment in torch.cuda.memory_snapshot()
            if segment["device"] == index and tuple(segment.get("segment_pool_id", ())) == pool_id
        )
    return MemoryStats(
        allocated_bytes=torch.cuda.memory_allocated(index),
        reserved_bytes=torch.cuda.memory_reserved(index),
        pool_bytes=pool_bytes,
    )
