"""graphhal's hardware abstraction layer: the device-graph contract and the facade runners use.

    import hal
    device = hal.get_device("cuda:0")
    graph = device.make_graph(hal.GraphMode.FULL)
    with device.capture_session(graph, pool=device.graph_pool()):
        out = step(static_inputs)
    device.replay(graph)        # out now holds the result; the next replay overwrites it

This module only re-exports what a device-plugin author and a server use. The floors, from the ground up:
the device contract (``hal.hookspecs``, ``hal.registry``, the ``Device`` facade, ``DeviceGraph``) -> the
strategies built only on it (``hal.breakable``, ``hal.piecewise``, each registering its mode), the capture
per key (``hal.graph_per_key``) and the torch.compile room (``hal.compile``) -> runners, outside hal, which
import that machinery by its path. Device plugins implement the hooks in ``hal.hookspecs`` with
``@hal.hookimpl`` and register under the entry-point group ``graphhal.devices``.
"""

from hal.all_reducer import AllReducer
from hal.compile.token_specialization import TokenSpecializationError
from hal.conventions import DeviceConventions, SlotRole
from hal.device import Device
from hal.device_id import DeviceId
from hal.errors import (
    CaptureError,
    DeviceUnavailableError,
    GraphHalError,
    GraphStateError,
    PluginContractError,
    StaticAddressError,
    UnknownDeviceError,
    UnsupportedModeError,
)
from hal.graph import DeviceGraph
from hal.graph_modes import Compiler, GraphMode
from hal.graph_support import BatchKind, GraphSupport, declare_graph_support
from hal.hookspecs import REQUIRED_HOOKS
from hal.markers import ENTRY_POINT_GROUP, PROJECT_NAME, hookimpl, hookspec
from hal.memory_stats import MIB, MemoryStats
from hal.registry import (
    DeviceRegistry,
    PluginLoadWarning,
    best_available_device,
    default_registry,
    get_device,
    reload_plugins,
)
from hal.step_host_values import host_list, step_host_values

# The strategies, above the contract: importing them registers their modes with the facade.
from hal.breakable import break_graph, break_point
from hal.piecewise import register_splitting_op

__all__ = [
    # devices and the registry
    "Device",
    "DeviceGraph",
    "DeviceId",
    "DeviceRegistry",
    "PluginLoadWarning",
    "best_available_device",
    "default_registry",
    "get_device",
    "reload_plugins",
    # the vocabulary
    "Compiler",
    "GraphMode",
    # writing a device plugin
    "ENTRY_POINT_GROUP",
    "PROJECT_NAME",
    "REQUIRED_HOOKS",
    "AllReducer",
    "DeviceConventions",
    "MIB",
    "MemoryStats",
    "SlotRole",
    "hookimpl",
    "hookspec",
    # what a model declares
    "BatchKind",
    "GraphSupport",
    "break_graph",
    "break_point",
    "declare_graph_support",
    "register_splitting_op",
    # host values a step reads once (kernels taking host lengths)
    "host_list",
    "step_host_values",
    # errors a user catches
    "CaptureError",
    "DeviceUnavailableError",
    "GraphHalError",
    "GraphStateError",
    "PluginContractError",
    "StaticAddressError",
    "TokenSpecializationError",
    "UnknownDeviceError",
    "UnsupportedModeError",
]
