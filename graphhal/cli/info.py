"""``graphhal info``: what graphhal finds on this machine, for a bug report or a first look.

Devices (built in and from entry points), which are available and the modes each offers, the plugins that
failed to load and why, the versions that matter, and the GPUs. It must work precisely when something is
broken, so every probe is isolated: a plugin that raises while answering is reported, not fatal. torch_npu
is probed through its package metadata only: importing it without Ascend's libraries can abort the process.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

import hal
from hal.device import offered_modes

# Distributions whose versions decide what works; looked up by metadata, never imported.
VERSIONED = ("graphhal", "torch", "triton", "pluggy", "torch-npu")


@dataclass
class DeviceInfo:
    type: str
    plugin: str
    origin: str  # "built-in", or the entry point that provided it
    available: bool
    modes: list[str] | None = None  # Device.modes; None where the device is not available (no Device exists)
    graph_modes: list[str] | None = None  # the modes runners could ask for, from what its plugin declares, present or not
    graph_modes_error: str | None = None  # why the plugin could not say (often: why the device is absent)
    error: str | None = None  # what the plugin raised while asked whether the device is available
    stack_checks: list[str] = field(default_factory=list)  # the plugin's checks of the stack under it


@dataclass
class GpuInfo:
    index: int
    name: str
    total_memory_bytes: int
    capability: str


@dataclass
class MachineInfo:
    devices: list[DeviceInfo] = field(default_factory=list)
    broken_plugins: list[dict[str, str]] = field(default_factory=list)
    versions: dict[str, str | None] = field(default_factory=dict)  # None: not installed
    python: str = platform.python_version()
    cuda_runtime: str | None = None
    gpus: list[GpuInfo] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # probes that failed outside any one device


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _device_info(registry: hal.DeviceRegistry, device_type: str, plugin: str) -> DeviceInfo:
    info = DeviceInfo(device_type, plugin, registry.origin_of(plugin) or "registered in code", available=False)
    # Third-party plugin code: anything may come out of it, and each answer is worth having on its own.
    try:
        info.available = registry.is_available(device_type)
        info.error = registry.unavailable_reason(device_type)
        if info.available:
            info.modes = list(registry.get_device(device_type).modes)
    except Exception as exc:
        info.available = False
        info.error = _error(exc)
    try:
        # The plugin's own graph modes, and the strategies hal adds wherever there are full graphs.
        info.graph_modes = list(offered_modes(tuple(registry.graph_modes_of(device_type))))
    except Exception as exc:
        info.graph_modes_error = _error(exc)
    try:
        info.stack_checks = registry.stack_checks_of(device_type)
    except Exception as exc:
        info.stack_checks = [f"the plugin's stack checks failed: {_error(exc)}"]
    return info


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gpus() -> list[GpuInfo]:
    gpus = []
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        gpus.append(GpuInfo(index, properties.name, properties.total_memory, f"{properties.major}.{properties.minor}"))
    return gpus


def collect() -> MachineInfo:
    """Probe everything; never raises for a failing plugin or probe (the failure is in the result)."""
    machine = MachineInfo(versions={name: _version(name) for name in VERSIONED})
    try:
        # A fresh registry: discovery as of now, including plugins installed since this process started.
        # Load failures become registry.broken, listed below, so their warnings would only repeat them.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hal.PluginLoadWarning)
            registry = hal.DeviceRegistry()
    except Exception as exc:
        machine.errors.append(f"discovering device plugins failed: {_error(exc)}")
    else:
        for device_type, plugin in sorted(registry.device_types().items()):
            machine.devices.append(_device_info(registry, device_type, plugin))
        machine.broken_plugins = [asdict(broken) for broken in registry.broken.values()]
    machine.cuda_runtime = torch.version.cuda
    try:
        if torch.cuda.is_available():
            machine.gpus = _gpus()
    except Exception as exc:
        machine.errors.append(f"querying CUDA GPUs failed: {_error(exc)}")
    return machine


def render(machine: MachineInfo) -> str:
    lines = ["devices:"]
    for device in machine.devices:
        state = "available" if device.available else "not available"
        if device.modes is not None:
            modes = f"; modes: {', '.join(device.modes)}"
        elif device.graph_modes is not None:  # what it would offer: tells a missing driver from a missing feature
            modes = f"; modes when present: {', '.join(device.graph_modes) or 'none'}"
        elif device.graph_modes_error is not None:
            modes = f" ({device.graph_modes_error})"
        else:
            modes = ""
        lines.append(f"  {device.type:<8} {state}{modes}  [{device.plugin}, {device.origin}]")
        if device.error:
            lines.append(f"           error: {device.error}")
        for check in device.stack_checks:
            lines.append(f"           {check}")
    if not machine.devices:
        lines.append("  none")
    lines.append("plugins that failed to load:" if machine.broken_plugins else "plugins that failed to load: none")
    for broken in machine.broken_plugins:
        lines.append(f"  {broken['name']} ({broken['origin']}): {broken['reason']}")
    lines.append("versions:")
    lines.append(f"  python     {machine.python}")
    for name, version in machine.versions.items():
        lines.append(f"  {name:<10} {version or 'not installed'}")
    lines.append(f"  CUDA       {machine.cuda_runtime or 'not in this torch build'}")
    if machine.gpus:
        lines.append("GPUs:")
        for gpu in machine.gpus:
            lines.append(f"  cuda:{gpu.index}  {gpu.name}, {gpu.total_memory_bytes / 2**30:.1f} GiB, compute capability {gpu.capability}")
    else:
        lines.append("GPUs: none visible to torch")
    for error in machine.errors:
        lines.append(f"error: {error}")
    return "\n".join(lines)


def to_json(machine: MachineInfo) -> dict[str, Any]:
    return asdict(machine)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")


def run(args: argparse.Namespace) -> int:
    machine = collect()
    print(json.dumps(to_json(machine), indent=2) if args.json else render(machine))
    return 0
