"""What the registry binds when the owning plugin leaves an optional hook unimplemented (the specs in
``hal.hookspecs`` name these defaults; every hook not in ``REQUIRED_HOOKS`` has one here)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from hal.conventions import DeviceConventions
from hal.device_id import DeviceId
from hal.errors import GraphHalError
from hal.memory_stats import MemoryStats


def hal_torch_device(device: DeviceId) -> torch.device:
    return torch.device(device.type, device.index)


def hal_needs_graph_update(device: DeviceId) -> bool:
    return False


def hal_capture_executes_work(device: DeviceId) -> bool:
    return False


def hal_update(graph: Any, params: Mapping[str, Any]) -> bool:
    raise GraphHalError(
        "this device bakes no host-side values into its graphs (hal_needs_graph_update is False); "
        "there is nothing to update"
    )


def hal_graph_pool(device: DeviceId) -> None:
    return None


def hal_capture_stream(device: DeviceId) -> None:
    return None


def hal_compiled_capture_problem(device: DeviceId, mode: str, compiler: str) -> None:
    return None


def hal_conventions(device: DeviceId) -> DeviceConventions:
    return DeviceConventions()


def hal_distributed_backend(device: DeviceId) -> None:
    return None


def hal_event(device: DeviceId) -> None:
    return None


def hal_memory_stats(device: DeviceId, pool: Any) -> MemoryStats:
    return MemoryStats()


def hal_graph_budget(device: DeviceId) -> None:
    return None


def hal_stack_checks(device: DeviceId) -> list[str]:
    return []


def hal_release_cached_memory(device: DeviceId) -> None:
    return None


def hal_all_reducer(device: DeviceId, group: Any) -> None:
    return None


OPTIONAL_HOOK_DEFAULTS = {
    "hal_torch_device": hal_torch_device,
    "hal_needs_graph_update": hal_needs_graph_update,
    "hal_capture_executes_work": hal_capture_executes_work,
    "hal_update": hal_update,
    "hal_graph_pool": hal_graph_pool,
    "hal_capture_stream": hal_capture_stream,
    "hal_memory_stats": hal_memory_stats,
    "hal_conventions": hal_conventions,
    "hal_compiled_capture_problem": hal_compiled_capture_problem,
    "hal_distributed_backend": hal_distributed_backend,
    "hal_event": hal_event,
    "hal_stack_checks": hal_stack_checks,
    "hal_graph_budget": hal_graph_budget,
    "hal_release_cached_memory": hal_release_cached_memory,
    "hal_all_reducer": hal_all_reducer,
}
