"""The cuda device: full graphs on ``torch.cuda.CUDAGraph``, a shared pool, a side capture stream."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch

from devices.cuda.capture_session import CudaCaptureSession
from devices.cuda.cuda_graph import CudaGraph
from devices.cuda.symmetric_all_reduce import SymmetricAllReducer, make_symmetric_all_reducer, stack_check_line
from devices.cuda.triton_key_warmup import start_hashing_triton_key
from hal import DeviceId, GraphMode, MemoryStats, hookimpl

DEVICE_TYPE = "cuda"
GRAPH_MODES = (GraphMode.FULL.value,)

_capture_streams: dict[int, torch.cuda.Stream] = {}


def _index(device: DeviceId) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@hookimpl
def hal_device_types() -> list[str]:
    return [DEVICE_TYPE]


@hookimpl
def hal_is_available(device: DeviceId) -> bool:
    if not torch.cuda.is_available():
        return False
    return device.index is None or device.index < torch.cuda.device_count()


@hookimpl
def hal_graph_modes(device: DeviceId) -> tuple[str, ...]:
    return GRAPH_MODES


@hookimpl
def hal_torch_device(device: DeviceId) -> torch.device:
    return torch.device(DEVICE_TYPE, _index(device))


@hookimpl
def hal_make_graph(device: DeviceId, mode: str) -> CudaGraph:
    return CudaGraph(_index(device))


@hookimpl
def hal_capture_session(graph: CudaGraph, pool: Any, stream: Any) -> AbstractContextManager[Any]:
    return CudaCaptureSession(graph, pool, stream)


@hookimpl
def hal_replay(graph: CudaGraph) -> None:
    graph.replay()


@hookimpl
def hal_graph_pool(device: DeviceId) -> Any:
    with torch.cuda.device(_index(device)):
        return torch.cuda.graph_pool_handle()


@hookimpl
def hal_capture_stream(device: DeviceId) -> torch.cuda.Stream:
    """One side stream per GPU, shared by every runner: captures never run on the legacy default stream."""
    index = _index(device)
    if index not in _capture_streams:
        _capture_streams[index] = torch.cuda.Stream(device=index)
        start_hashing_triton_key()  # the device is being made: overlap Triton's key with the model's loading
    return _capture_streams[index]


@hookimpl
def hal_synchronize(device: DeviceId) -> None:
    torch.cuda.synchronize(_index(device))


@hookimpl
def hal_distributed_backend(device: DeviceId) -> str:
    return "nccl"


@hookimpl
def hal_all_reducer(device: DeviceId, group: Any) -> SymmetricAllReducer | None:
    """torch's symmetric-memory kernels for small messages, where every rank can use them (else NCCL)."""
    return None if group is None else make_symmetric_all_reducer(group, _index(device))


@hookimpl
def hal_stack_checks(device: DeviceId) -> list[str]:
    return [stack_check_line()]


class _StepEvent:
    """A ``torch.cuda.Event`` recorded on the current stream of its own device, where a runner queues a step.

    ``torch.cuda.Event().record()`` records on the current stream of the *current* device; a runner on
    ``cuda:1`` driven from a thread whose current device is 0 queues its copies and replays on device 1's
    stream (a graph replays on its own device), so the event would have completed before the step did.
    Waiting spins a host core (``blocking=False``, torch's default): the wake-up comes microseconds sooner
    than a blocking event's, which the overlapped loop, waiting one step late, turns into throughput.
    """

    __slots__ = ("_event", "_index")

    def __init__(self, index: int) -> None:
        self._event = torch.cuda.Event()
        self._index = index

    def record(self) -> None:
        self._event.record(torch.cuda.current_stream(self._index))

    def query(self) -> bool:
        return self._event.query()

    def synchronize(self) -> None:
        self._event.synchronize()


@hookimpl
def hal_event(device: DeviceId) -> _StepEvent:
    return _StepEvent(_index(device))


@hookimpl
def hal_release_cached_memory(device: DeviceId) -> None:
    with torch.cuda.device(_index(device)):
        torch.cuda.empty_cache()


@hookimpl
def hal_memory_stats(device: DeviceId, pool: Any) -> MemoryStats:
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
    free, total = torch.cuda.mem_get_info(index)  # the driver's view: graph objects and NCCL buffers included
    return MemoryStats(
        allocated_bytes=torch.cuda.memory_allocated(index),
        reserved_bytes=torch.cuda.memory_reserved(index),
        pool_bytes=pool_bytes,
        device_free_bytes=int(free),
        device_total_bytes=int(total),
    )
