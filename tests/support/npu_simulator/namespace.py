"""Installing the SIMULATED ``torch_npu`` module and ``torch.npu`` namespace of one profile, and removing them.

While installed: ``sys.modules["torch_npu"]`` (and the submodules graphhal looks into) are the simulator's,
``torch.npu`` is its namespace (the device's streams, ``capture.DeviceQueue``, are a dispatch mode only while
a capture or an update is open), and ``Tensor.tolist``/``Tensor.numpy`` refuse to run inside a capture (they read values on
the host without going through the dispatcher, so the device queue cannot see them). What the module offers
follows the profile (``profiles``): FIA v2 and the paged-attention workspace helper from 7.2, the
``_infer_output`` helpers from 7.3, the handler registry module from 26.0. Uninstalling restores everything
exactly as it was, popping any dispatch mode a failed capture left pushed.
"""

from __future__ import annotations

import importlib.machinery
import sys
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Iterator

import torch

from support.npu_simulator import capture, kernels, npugraph, npugraph_handlers, state, streams, weak_refs
from support.npu_simulator.errors import HostReadDuringCaptureError, SimulatorError
from support.npu_simulator.profiles import NEWEST, TorchNpuProfile

LABEL = "graphhal tests' CPU SIMULATOR of torch_npu's graph API (not torch_npu)"

_MODULE_NAMES = (
    "torch_npu",
    "torch_npu._C",
    "torch_npu.npu",
    "torch_npu.npu._npugraph_handlers",
    "torch_npu.npu._npugraph_handlers.npugraph_handler",
)
_HOST_READS = ("tolist", "numpy")


def _module(name: str, **attributes: Any) -> ModuleType:
    module = ModuleType(name, f"{LABEL}: {name}")
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, origin="npu-simulator")
    module.__path__ = []  # a package, so importlib resolves the submodules below from sys.modules
    module.__simulator__ = LABEL
    for key, value in attributes.items():
        setattr(module, key, value)
    return module


def _npu_namespace(sim: state.SimulatorState) -> ModuleType:
    def synchronize(device: Any = None) -> None:
        for stream in sim.streams:  # the host waits for everything issued so far, on every stream
            sim.host_synchronize(stream.clock)

    def set_device(device: Any) -> None:
        sim.current_device = streams._device_index(device)

    def flush_cache() -> None:
        sim.cache_flushes += 1

    return _module(
        "torch_npu.npu",
        is_available=lambda: sim.device_count > 0,
        device_count=lambda: sim.device_count,
        current_device=lambda: sim.current_device,
        set_device=set_device,
        device=streams.device,
        synchronize=synchronize,
        current_stream=lambda device=None: sim.current_stream(None if device is None else streams._device_index(device)),
        default_stream=lambda device=None: sim.default_stream(None if device is None else streams._device_index(device)),
        stream=streams.stream,
        Stream=streams.Stream,
        Event=streams.Event,
        ExternalEvent=streams.ExternalEvent,
        NPUGraph=npugraph.NPUGraph,
        graph=npugraph.graph,
        graph_pool_handle=lambda: sim.new_pool_id(user_created=True),
        is_current_stream_capturing=lambda: sim.current_stream().capturing is not None,
        graph_task_group_begin=capture.graph_task_group_begin,
        graph_task_group_end=capture.graph_task_group_end,
        graph_task_update_begin=capture.graph_task_update_begin,
        graph_task_update_end=capture.graph_task_update_end,
        empty_cache=flush_cache,
        host_empty_cache=flush_cache,
        memory_allocated=lambda device=None: 0,
        memory_reserved=lambda device=None: 0,
        # torch_npu.npu.mem_get_info: (free, total) bytes of the device as a whole (aclrtGetMemInfo).
        mem_get_info=lambda device=None: (sim.device_total_bytes - sim.device_used_bytes, sim.device_total_bytes),
    )


def _torch_npu_module(sim: state.SimulatorState, npu: ModuleType) -> tuple[ModuleType, ...]:
    profile = sim.profile
    ops = kernels.ops(profile)
    compiled = _module(
        "torch_npu._C",
        _npu_endAllocateCurrentStreamToPool=lambda device, pool: sim.end_allocate_to_pool(int(device), pool),
        _weak_ref_tensor=weak_refs.weak_ref_tensor,
    )
    attributes: dict[str, Any] = {
        "npu_fused_infer_attention_score": ops.npu_fused_infer_attention_score,
        "_npu_fused_infer_attention_score_get_max_workspace": kernels.fia_max_workspace,
        "_npu_paged_attention": ops._npu_paged_attention,
    }
    if profile.fia_v2:
        attributes["npu_fused_infer_attention_score_v2"] = ops.npu_fused_infer_attention_score_v2
        attributes["_npu_fused_infer_attention_score_v2_get_max_workspace"] = kernels.fia_v2_max_workspace
    if profile.paged_attention_workspace:
        attributes["_npu_paged_attention_get_workspace"] = kernels.paged_attention_workspace
    if profile.infer_output:
        attributes["_npu_fused_infer_attention_score_infer_output"] = kernels.fia_infer_output
        attributes["_npu_fused_infer_attention_score_v2_infer_output"] = kernels.fia_infer_output
    torch_npu = _module("torch_npu", __version__=profile.version, npu=npu, _C=compiled, **attributes)
    if not profile.has_handler_registry:
        return torch_npu, compiled, npu
    handlers = _module(
        "torch_npu.npu._npugraph_handlers.npugraph_handler",
        _NPU_GRAPH_OP_HANDLERS=npugraph_handlers.NPU_GRAPH_OP_HANDLERS,
        NpuGraphOpHandler=npugraph_handlers.NpuGraphOpHandler,
    )
    npu._npugraph_handlers = _module("torch_npu.npu._npugraph_handlers", npugraph_handler=handlers)
    return torch_npu, compiled, npu, npu._npugraph_handlers, handlers


@contextmanager
def installed(profile: TorchNpuProfile = NEWEST, device_count: int = 1) -> Iterator[state.SimulatorState]:
    """Install the simulator of ``profile`` for the duration of the block; yields its state."""
    if "torch_npu" in sys.modules and not getattr(sys.modules["torch_npu"], "__simulator__", None):
        raise SimulatorError("a real torch_npu is imported in this process; the simulator will not shadow it")
    if state._active is not None:
        raise SimulatorError("the npu simulator is already installed")
    if torch._C._len_torch_dispatch_stack():
        raise SimulatorError("install the simulator with no dispatch mode active: every mode left at uninstall is reported as a leak")
    sim = state.SimulatorState(profile=profile, device_count=device_count)
    npu = _npu_namespace(sim)
    sim.namespace = npu
    modules = _torch_npu_module(sim, npu)
    sim.torch_npu = modules[0]

    saved_modules = {name: sys.modules.get(name) for name in _MODULE_NAMES}
    had_torch_npu_attr, saved_torch_npu_attr = hasattr(torch, "npu"), getattr(torch, "npu", None)
    saved_reads = {name: torch.Tensor.__dict__.get(name) for name in _HOST_READS}
    state.activate(sim)
    sys.modules.update({module.__name__: module for module in modules})
    torch.npu = npu
    for name in _HOST_READS:
        setattr(torch.Tensor, name, _refused_in_capture(name, getattr(torch._C.TensorBase, name)))
    try:
        yield sim
    finally:
        state.SimulatorMode.exit_all(sim)  # torch_npu's mode a failing torch.npu.graph left pushed
        left = sim.modes_above_device()  # someone else's (a plugin's): popped, and reported below
        for mode in reversed(left):
            mode.__exit__(None, None, None)
        capture.device_queue_off(sim, all_of_it=True)
        for name, saved in saved_reads.items():
            if saved is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, saved)
        if had_torch_npu_attr:
            torch.npu = saved_torch_npu_attr
        else:
            del torch.npu
        for name, module in saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        state.activate(None)
        if left and sys.exc_info()[0] is None:
            raise SimulatorError(f"dispatch modes the simulator did not push were left active above it: {left}")


def _refused_in_capture(name: str, original: Any) -> Any:
    def host_read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        sim = state._active
        if sim is not None and sim.capturing_graph is not None:
            raise HostReadDuringCaptureError(
                f"Tensor.{name}() read a tensor's values on the host while an NPU graph was being captured: the "
                "stream only records, there are no values yet (use host values you already have, or placeholders "
                "an update replaces)"
            )
        return original(self, *args, **kwargs)

    host_read.__name__ = name
    return host_read
