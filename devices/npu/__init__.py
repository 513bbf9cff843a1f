"""The npu device (Ascend, through torch_npu): registration and availability only, for now.

This module must import cleanly where torch_npu is absent or broken: without Ascend's CANN libraries,
importing torch_npu raises, so it is probed with ``find_spec`` and imported only inside a guarded call.
It serves the ``npu`` type so that ``graphhal`` lists it, reports it unavailable here, and offers no graph
modes yet: NPUGraph capture and the async update of host-side parameters arrive with the NPU plugin work.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging

from hal import DeviceId, hookimpl

DEVICE_TYPE = "npu"
GRAPH_MODES: tuple[str, ...] = ()  # NPUGraph support is not implemented yet

logger = logging.getLogger(__name__)


def _torch_npu_usable() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        torch_npu = importlib.import_module("torch_npu")
        return bool(torch_npu.npu.is_available())
    except Exception as exc:  # a broken CANN install raises all kinds of errors at import
        logger.debug("graphhal: torch_npu is installed but unusable: %s", exc)
        return False


def _mine(device: DeviceId) -> bool:
    return device.type == DEVICE_TYPE


@hookimpl
def hal_device_types() -> list[str]:
    return [DEVICE_TYPE]


@hookimpl
def hal_is_available(device: DeviceId) -> bool | None:
    if not _mine(device):
        return None
    # No graph modes yet, so even a machine with a working Ascend card cannot capture through graphhal.
    return bool(GRAPH_MODES) and _torch_npu_usable()


@hookimpl
def hal_graph_modes(device: DeviceId) -> tuple[str, ...] | None:
    return GRAPH_MODES if _mine(device) else None


@hookimpl
def hal_make_graph(device: DeviceId, mode: str) -> None:
    return None


@hookimpl
def hal_capture_session(graph: object, pool: object, stream: object) -> None:
    return None


@hookimpl
def hal_replay(graph: object) -> None:
    return None


@hookimpl
def hal_synchronize(device: DeviceId) -> None:
    return None
