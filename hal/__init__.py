"""graphhal's hardware abstraction layer: the device-graph contract and the facade runners use.

    import hal
    device = hal.get_device("cuda:0")
    graph = device.make_graph("full")
    with device.capture_session(graph, pool=device.graph_pool()):
        out = step(static_inputs)
    device.replay(graph)        # out now holds the result; the next replay overwrites it

Device plugins implement the hooks in ``hal.hookspecs`` with ``@hal.hookimpl`` and register under the
entry-point group ``graphhal.devices``.
"""

from hal.break_points import BreakInFullGraphError, BreakPoint, break_graph, break_point
from hal.break_results import BreakResultMismatchError
from hal.breakable_graph import BREAKABLE_MODE, BreakableGraph, SegmentEndError
from hal.conventions import DeviceConventions, SlotRole
from hal.device import EAGER_MODE, Device
from hal.piecewise_backend import PIECE_COMPILERS, PIECEWISE_MODE, PiecewiseBackend
from hal.compiled_forward import CompiledForward, InductorBackend
from hal.device_id import DeviceId
from hal.errors import (
    CaptureError,
    DeviceUnavailableError,
    GraphHalError,
    PluginContractError,
    StaticAddressError,
    UnknownDeviceError,
    UnsupportedModeError,
)
from hal.markers import ENTRY_POINT_GROUP, PROJECT_NAME, hookimpl, hookspec
from hal.memory_stats import MIB, MemoryStats
from hal.splitting_ops import SplittingOpError, register_splitting_op, registered_splitting_ops, unregister_splitting_op
from hal.registry import (
    BrokenPlugin,
    DeviceRegistry,
    PluginLoadWarning,
    best_available_device,
    default_registry,
    get_device,
    reload_plugins,
)

__all__ = [
    "BREAKABLE_MODE",
    "EAGER_MODE",
    "ENTRY_POINT_GROUP",
    "InductorBackend",
    "MIB",
    "PIECEWISE_MODE",
    "PIECE_COMPILERS",
    "PROJECT_NAME",
    "BreakInFullGraphError",
    "BreakPoint",
    "BreakResultMismatchError",
    "BreakableGraph",
    "BrokenPlugin",
    "CaptureError",
    "CompiledForward",
    "Device",
    "DeviceConventions",
    "DeviceId",
    "DeviceRegistry",
    "DeviceUnavailableError",
    "GraphHalError",
    "MemoryStats",
    "PiecewiseBackend",
    "PluginContractError",
    "PluginLoadWarning",
    "SegmentEndError",
    "SlotRole",
    "SplittingOpError",
    "StaticAddressError",
    "UnknownDeviceError",
    "UnsupportedModeError",
    "best_available_device",
    "break_graph",
    "break_point",
    "default_registry",
    "get_device",
    "hookimpl",
    "hookspec",
    "register_splitting_op",
    "registered_splitting_ops",
    "reload_plugins",
    "unregister_splitting_op",
]
