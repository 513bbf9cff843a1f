"""graphhal's hardware abstraction layer: the device-graph contract and the facade runners use.

    import hal
    device = hal.get_device("cuda:0")
    graph = device.make_graph(hal.GraphMode.FULL)
    with device.capture_session(graph, pool=device.graph_pool()):
        out = step(static_inputs)
    device.replay(graph)        # out now holds the result; the next replay overwrites it

The floors, from the ground up: the device contract (``hookspecs``, the registry, the ``Device`` facade,
``DeviceGraph``) -> the strategies built only on it (``hal.breakable``, ``hal.piecewise``, each registering its
mode) and the capture-per-key primitive (``GraphPerKey``) -> runners, outside hal. Device plugins implement
the hooks in ``hal.hookspecs`` with ``@hal.hookimpl`` and register under the entry-point group
``graphhal.devices``. This module only re-exports.
"""

from hal.capture_state import current_capture
from hal.compiled_forward import CompiledForward, InductorBackend, RecompileError
from hal.conventions import DeviceConventions, SlotRole
from hal.device import Device, PluginGraph
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
from hal.graph import DeviceGraph
from hal.graph_modes import GraphMode
from hal.graph_support import (
    BatchKind,
    GraphSupport,
    ReachedOp,
    declare_graph_support,
    graph_support_of,
    ops_reached,
)
from hal.graph_per_key import AfterWarmup, CapturedGraph, GraphPerKey, WarmUpError
from hal.hookspecs import REQUIRED_HOOKS
from hal.markers import ENTRY_POINT_GROUP, PROJECT_NAME, hookimpl, hookspec
from hal.memory_stats import MIB, MemoryStats
from hal.pool_aliases import non_owning_outputs
from hal.registry import (
    BUILTIN_DEVICE_PLUGINS,
    BrokenPlugin,
    DeviceRegistry,
    PluginLoadWarning,
    best_available_device,
    default_registry,
    get_device,
    reload_plugins,
)
from hal.stored_compile import CompileStore
from hal.token_specialization import TokenSpecializationError

# The strategies, above the contract: importing them registers their modes with the facade.
from hal.breakable import (
    BreakableGraph,
    BreakableStateError,
    BreakInFullGraphError,
    BreakPoint,
    BreakResultMismatchError,
    SegmentEndError,
    break_graph,
    break_point,
)
from hal.piecewise import (
    PIECE_COMPILERS,
    PiecewiseBackend,
    PiecewisePiece,
    SplittingOpError,
    register_splitting_op,
    registered_splitting_ops,
    unregister_splitting_op,
)

__all__ = [
    "AfterWarmup",
    "BatchKind",
    "GraphSupport",
    "ReachedOp",
    "declare_graph_support",
    "graph_support_of",
    "ops_reached",
    "BUILTIN_DEVICE_PLUGINS",
    "ENTRY_POINT_GROUP",
    "MIB",
    "PIECE_COMPILERS",
    "PROJECT_NAME",
    "REQUIRED_HOOKS",
    "BreakInFullGraphError",
    "BreakPoint",
    "BreakResultMismatchError",
    "BreakableGraph",
    "BreakableStateError",
    "BrokenPlugin",
    "CaptureError",
    "CapturedGraph",
    "CompiledForward",
    "CompileStore",
    "Device",
    "DeviceConventions",
    "DeviceGraph",
    "DeviceId",
    "DeviceRegistry",
    "DeviceUnavailableError",
    "GraphHalError",
    "GraphMode",
    "GraphPerKey",
    "InductorBackend",
    "MemoryStats",
    "PiecewiseBackend",
    "PiecewisePiece",
    "PluginContractError",
    "PluginGraph",
    "PluginLoadWarning",
    "RecompileError",
    "SegmentEndError",
    "SlotRole",
    "SplittingOpError",
    "StaticAddressError",
    "TokenSpecializationError",
    "UnknownDeviceError",
    "UnsupportedModeError",
    "WarmUpError",
    "best_available_device",
    "break_graph",
    "break_point",
    "current_capture",
    "default_registry",
    "get_device",
    "hookimpl",
    "hookspec",
    "non_owning_outputs",
    "register_splitting_op",
    "registered_splitting_ops",
    "reload_plugins",
    "unregister_splitting_op",
]
