"""The npu device (Ascend, through torch_npu): full graphs on ``torch.npu.NPUGraph``, host lengths updated per run.

Ascend attention kernels take per-request lengths as host values, and a captured NPU graph bakes them in.
While a graph is captured, the plugin brackets every such launch itself in a task group gated by an
ExternalEvent, with its outputs and workspace preallocated and held for the graph's life
(``host_length_launches``); ``hal_update`` then re-issues those launches with the live lengths on an update
stream of the graph's device, ordered after the graph's previous replay, and the replay's gated tasks wait
for it (``npu_graph`` explains the order). Decode launches take the KV lengths (``seq_lens``); packed prefill
launches (FIA's "TND" layout) also the query lengths as cumulative ends (``query_lens``), so a whole prefill
step is capturable too (``launch_lengths``). torch_npu's own ``auto_dispatch_capture`` is never used: what it
handles differs per release line (``capture_session`` says how).

Before anything is captured, the preflight (``preflight``) checks the Ascend stack's prerequisites of
updatable graphs (driver, CANN runtime, ``TASK_QUEUE_ENABLE``) when the device is loaded and at every new
graph, and refuses with what to change; ``graphhal info`` shows its checks.

Supported: the torch_npu lines 7.1, 7.2, 7.3 and 26.0 on, decided by the API a build has, not its version
(``runtime``); ``_npu_paged_attention`` in a graph needs 7.2 on (its workspace). ``full`` with
``compiler="inductor"`` is refused (``hal_compiled_capture_problem``). Conventions the runners ask for rather
than hard-code: int32 cache locations, int32 lengths padded with 0 (what vllm-ascend pads its graph's
request slots with, acl_graph.py L290 at releases/v0.13.0).

This module imports cleanly where torch_npu is absent or broken: torch_npu is only imported, guarded, when a
hook first needs it. Where npu tensors live is the ``placement`` seam (``torch.device("npu", i)`` on
hardware); tests run the plugin against a CPU simulator of torch_npu through it (tests/support).
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from typing import Any, Mapping

import torch

from devices.npu import placement, stream_budget
from devices.npu.capture_session import NpuCaptureSession
from devices.npu.graph_update import update_graph
from devices.npu.npu_graph import NpuGraph
from devices.npu.preflight import refuse_failures, stack_checks
from devices.npu.runtime import find_torch_npu, torch_npu_runtime
from hal import Compiler, DeviceConventions, DeviceId, GraphMode, MemoryStats, hookimpl

DEVICE_TYPE = "npu"
GRAPH_MODES = ("full",)
NPU_CONVENTIONS = DeviceConventions(cache_location_dtype=torch.int32, seq_len_dtype=torch.int32, seq_len_fill=0)

logger = logging.getLogger(__name__)


def _index(device: DeviceId) -> int:
    return device.index if device.index is not None else int(torch_npu_runtime().npu.current_device())


@hookimpl
def hal_device_types() -> list[str]:
    return [DEVICE_TYPE]


@hookimpl
def hal_is_available(device: DeviceId) -> bool:
    module, reason = find_torch_npu()
    if module is None:
        logger.debug("graphhal: npu unavailable: %s", reason)
        return False
    try:
        npu = module.npu
        if not npu.is_available():
            return False
        return device.index is None or device.index < npu.device_count()
    except Exception as exc:  # a half-working CANN install: unavailable, never an error here
        logger.debug("graphhal: npu unavailable: torch_npu raised %s: %s", type(exc).__name__, exc)
        return False


@hookimpl
def hal_graph_modes(device: DeviceId) -> tuple[str, ...]:
    runtime = torch_npu_runtime()  # refuses a torch_npu lacking the graph API, naming what is missing and its version
    refuse_failures(runtime.module)  # the stack's prerequisites of updatable graphs (preflight)
    return GRAPH_MODES


@hookimpl
def hal_stack_checks(device: DeviceId) -> list[str]:
    module, _ = find_torch_npu()
    if module is None:
        return []  # nothing to check under it: the device's error says why torch_npu is missing
    return [check.line() for check in stack_checks(module)]


@hookimpl
def hal_torch_device(device: DeviceId) -> torch.device:
    return placement.torch_device(_index(device))


@hookimpl
def hal_conventions(device: DeviceId) -> DeviceConventions:
    return NPU_CONVENTIONS


@hookimpl
def hal_needs_graph_update(device: DeviceId) -> bool:
    return True  # attention lengths are host values baked into captured tasks


@hookimpl
def hal_capture_executes_work(device: DeviceId) -> bool:
    return False  # captured work only runs at replay


# Why a full graph of an Inductor-compiled forward cannot be updated here: the attention runs inside the
# compiled code's call to a custom op (graphhal::decode_attention), whose npu kernel issues the fused op below
# every dispatch mode, so the capture cannot bracket it and its lengths would stay those of the capture. Its
# output would be silently wrong from the second step on. Breakable and piecewise keep attention eager.
FULL_INDUCTOR_PROBLEM = (
    "npu attention takes per-request lengths as host values that the npu device re-issues before every replay, "
    "finding those launches by watching torch ops during the capture; in an Inductor-compiled forward the "
    "attention runs inside a compiled call to an opaque op whose kernel no dispatch mode sees, so its lengths "
    "would stay those of the capture. Use compiler 'none' with mode 'full', or mode 'breakable' or 'piecewise' "
    "with compiler 'inductor' (attention then runs eagerly between the captured parts)"
)


@hookimpl
def hal_compiled_capture_problem(device: DeviceId, mode: str, compiler: str) -> str | None:
    # NPUGraph captures the stream, compiled kernels too: only full graphs' host-length updates object.
    if mode == GraphMode.FULL and compiler == Compiler.INDUCTOR:
        return FULL_INDUCTOR_PROBLEM
    return None


@hookimpl
def hal_distributed_backend(device: DeviceId) -> str:
    # HCCL collectives are captured into an NPUGraph like any other launch on the capture stream. Streams are
    # held by every graph, collectives or not: hal_graph_budget fits the buckets to them (stream_budget).
    return "hccl"


@hookimpl
def hal_make_graph(device: DeviceId, mode: str) -> NpuGraph:
    runtime = torch_npu_runtime()
    refuse_failures(runtime.module)  # again at capture: the environment may have changed since the device loaded
    graph = NpuGraph(runtime, _index(device))
    stream_budget.track(graph, graph.index)
    return graph


@hookimpl
def hal_graph_budget(device: DeviceId) -> int:
    return stream_budget.graphs_left(_index(device))


@hookimpl
def hal_capture_session(graph: NpuGraph, pool: Any, stream: Any) -> AbstractContextManager[Any]:
    return NpuCaptureSession(graph, pool, stream)


@hookimpl
def hal_replay(graph: NpuGraph) -> None:
    graph.replay()


@hookimpl
def hal_update(graph: NpuGraph, params: Mapping[str, Any]) -> None:
    update_graph(graph, params)


@hookimpl
def hal_graph_pool(device: DeviceId) -> Any:
    return torch_npu_runtime().npu.graph_pool_handle()


@hookimpl
def hal_capture_stream(device: DeviceId) -> Any:
    """One side stream per NPU, shared by every runner."""
    return torch_npu_runtime().capture_stream(_index(device))


@hookimpl
def hal_synchronize(device: DeviceId) -> None:
    torch_npu_runtime().npu.synchronize(_index(device))


@hookimpl
def hal_event(device: DeviceId) -> Any:
    return _StepEvent(_index(device))


class _StepEvent:
    """An npu event recorded on the current stream of its own device (not the current device's), where a
    runner queues its step: as the cuda plugin's, for a runner driven from a thread whose current device is
    another."""

    __slots__ = ("_event", "_index")

    def __init__(self, index: int) -> None:
        self._event = torch_npu_runtime().npu.Event()
        self._index = index

    def record(self) -> None:
        self._event.record(torch_npu_runtime().npu.current_stream(self._index))

    def query(self) -> bool:
        return bool(self._event.query())

    def synchronize(self) -> None:
        self._event.synchronize()


@hookimpl
def hal_release_cached_memory(device: DeviceId) -> None:
    torch_npu_runtime().npu.empty_cache()


@hookimpl
def hal_memory_stats(device: DeviceId, pool: Any) -> MemoryStats:
    npu, index = torch_npu_runtime().npu, _index(device)
    # torch_npu's mem_get_info (aclrtGetMemInfo): the device as a whole, the graphs' task memory included.
    free, total = npu.mem_get_info(index) if hasattr(npu, "mem_get_info") else (None, None)
    return MemoryStats(
        allocated_bytes=int(npu.memory_allocated(index)),
        reserved_bytes=int(npu.memory_reserved(index)),
        device_free_bytes=None if free is None else int(free),
        device_total_bytes=None if total is None else int(total),
    )
