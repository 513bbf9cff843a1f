"""The SIMULATED npu device: the state every part of the simulator shares while it is installed."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from support.npu_simulator.clocks import Clock, joined
from support.npu_simulator.errors import SimulatorError
from support.npu_simulator.profiles import TorchNpuProfile

if TYPE_CHECKING:
    from support.npu_simulator.streams import Stream

# Where a test can make the simulated C++ NPUGraph fail, and what torch_npu would say there (NPUGraph.cpp at
# v26.0.0): before the allocator routes into the pool (the TASK_QUEUE_ENABLE check, L163-167), after it
# (AclmdlRICaptureBegin, L220), and at the end (AclmdlRICaptureEnd, L247, before endAllocateToPool).
FAULTS = {
    "capture_begin_check": "Do not support TASK_QUEUE_ENABLE = 2 during NPU graph capture (simulated fault)",
    "capture_begin": "AclmdlRICaptureBegin failed (simulated fault)",
    "capture_end": "AclmdlRICaptureEnd failed: the capture was invalidated (simulated fault)",
}


@dataclass(frozen=True)
class Launch:
    """One run of a simulated kernel that takes host lengths: when it ran and with which lengths."""

    op: str
    phase: str  # "eager", "capture" or "replay"
    lengths: tuple[int, ...]  # the KV lengths, one per request
    query_ends: tuple[int, ...] | None = None  # packed ("TND") launches: the cumulative query lengths


@dataclass
class SimulatorState:
    """One installation of the simulator: its torch_npu profile, devices, streams, the host's view of
    finished work, the allocator's routing into graph pools, injected faults, a launch log."""

    profile: TorchNpuProfile
    device_count: int
    namespace: Any = None  # the simulated torch.npu module, looked up at call time like torch_npu does
    torch_npu: Any = None  # the simulated torch_npu module
    host_clock: Clock = field(default_factory=dict)
    launches: list[Launch] = field(default_factory=list)
    cache_flushes: int = 0  # empty_cache / host_empty_cache calls
    # What mem_get_info reports: a 64 GiB card (Atlas 800I A2), with what a test says is in use on it.
    device_total_bytes: int = 64 << 30
    device_used_bytes: int = 0
    gc_collects: int = 0  # gc.collect() calls torch.npu.graph would make (counted, not made)
    streams: list["Stream"] = field(default_factory=list)
    # The caching allocator's captures underway, per device: pool id routed into (beginAllocateToPool).
    pools_routed: dict[int, list[Any]] = field(default_factory=dict)
    faults: set[str] = field(default_factory=set)
    # Class attributes of torch_npu objects, kept per installation (they hold simulated streams).
    class_attributes: dict[str, Any] = field(default_factory=dict)
    device_queue: Any = None  # the mode standing for the device's streams while one captures or updates
    # The Ascend stack under torch_npu (the npu plugin's preflight reads it, devices/npu/ascend_stack.py): the
    # driver's version.info (None: no file) and what libascendcl.so and libopapi.so export (None: no library).
    driver_version: str | None = "25.0.rc1"
    runtime_symbols: frozenset[str] | None = frozenset({"aclmdlRICaptureTaskGrpBegin", "aclmdlRICaptureTaskUpdateBegin"})
    op_api_symbols: frozenset[str] | None = frozenset({"aclnnFusedInferAttentionScoreV3GetMaxWorkspaceSize"})
    _next_stream_id: int = 0
    _next_pool_id: int = 0
    _default_streams: dict[int, "Stream"] = field(default_factory=dict)
    _thread: threading.local = field(default_factory=threading.local)

    # --- ids, devices, streams ----------------------------------------------------------------------------

    def add_stream(self, stream: "Stream") -> int:
        """Register a new stream; returns its id."""
        self.streams.append(stream)
        self._next_stream_id += 1
        return self._next_stream_id

    def new_pool_id(self, user_created: bool) -> tuple[int, int]:
        """A MempoolId: (0, n) from graph_pool_handle(), (n, 0) for a graph's private pool (NPUGraph.cpp)."""
        self._next_pool_id += 1
        return (0, self._next_pool_id) if user_created else (self._next_pool_id, 0)

    def check_device(self, index: int) -> int:
        if not 0 <= index < self.device_count:
            raise SimulatorError(f"npu device {index} does not exist; the simulator has {self.device_count}")
        return index

    @property
    def current_device(self) -> int:
        return getattr(self._thread, "device", 0)

    @current_device.setter
    def current_device(self, index: int) -> None:
        self._thread.device = self.check_device(index)

    def default_stream(self, index: int | None = None) -> "Stream":
        from support.npu_simulator.streams import Stream

        index = self.current_device if index is None else self.check_device(index)
        if index not in self._default_streams:
            self._default_streams[index] = Stream(device=index)
        return self._default_streams[index]

    def current_stream(self, index: int | None = None) -> "Stream":
        index = self.current_device if index is None else index
        current = getattr(self._thread, "streams", {})
        return current.get(index) or self.default_stream(index)

    def set_current_stream(self, stream: "Stream") -> "Stream":
        """Make ``stream`` current for its device on this thread; return the one it replaces."""
        if not hasattr(self._thread, "streams"):
            self._thread.streams = {}
        previous = self.current_stream(stream.device_index)
        self._thread.streams[stream.device_index] = stream
        return previous

    # --- the caching allocator's routing into graph pools ---------------------------------------------------

    def begin_allocate_to_pool(self, device: int, pool: Any) -> None:
        """NPUCachingAllocator::beginAllocateToPool (NPUCachingAllocator.cpp L2094-2113 at v26.0.0)."""
        routed = self.pools_routed.setdefault(device, [])
        if pool in routed:
            raise RuntimeError(f"beginAllocateToPool: already recording to mempool_id {pool} (simulated)")
        routed.append(pool)

    def end_allocate_to_pool(self, device: int, pool: Any) -> None:
        """NPUCachingAllocator::endAllocateToPool (L2116-2126 at v26.0.0)."""
        routed = self.pools_routed.get(device, [])
        if pool not in routed:
            raise RuntimeError(f"endAllocatePool: not currently recording to mempool_id {pool} (simulated)")
        routed.remove(pool)
        if not routed:
            del self.pools_routed[device]

    def take_fault(self, point: str) -> None:
        """Raise torch_npu's error for ``point`` if a test asked for a fault there (once)."""
        if point in self.faults:
            self.faults.discard(point)
            raise RuntimeError(FAULTS[point])

    # --- what this thread is doing ------------------------------------------------------------------------

    @property
    def capturing_graph(self) -> Any:
        """The graph this thread is capturing into, or None."""
        return getattr(self._thread, "capturing", None)

    @capturing_graph.setter
    def capturing_graph(self, graph: Any) -> None:
        self._thread.capturing = graph

    @property
    def ops_running(self) -> list[Any]:
        """Ops the capture recorder is running right now, outermost first (to spot launches hidden in them)."""
        if not hasattr(self._thread, "ops_running"):
            self._thread.ops_running = []
        return self._thread.ops_running

    @property
    def queue_depth(self) -> int:
        """Captures and updates open on this thread, each of which needs the device queue under its modes."""
        return getattr(self._thread, "queue_depth", 0)

    @queue_depth.setter
    def queue_depth(self, depth: int) -> None:
        self._thread.queue_depth = depth

    @property
    def replaying(self) -> int:
        return getattr(self._thread, "replaying", 0)

    @replaying.setter
    def replaying(self, depth: int) -> None:
        self._thread.replaying = depth

    def host_synchronize(self, clock: Clock) -> None:
        """The host waited until everything in ``clock`` finished."""
        self.host_clock = joined(self.host_clock, clock)

    def log_launch(self, op: str, lengths: list[int], query_ends: list[int] | None = None) -> None:
        phase = "capture" if self.capturing_graph is not None else "replay" if self.replaying else "eager"
        self.launches.append(Launch(op, phase, tuple(lengths), None if query_ends is None else tuple(query_ends)))

    # --- dispatch modes -------------------------------------------------------------------------------------

    def modes_above_device(self) -> list[TorchDispatchMode]:
        """The dispatch modes on this thread's stack above the device's own (what a capture may leave behind:
        torch_npu's capture mode, a plugin's), bottom first."""
        stack = torch.utils._python_dispatch._get_current_dispatch_mode_stack()
        return [mode for mode in stack if mode is not self.device_queue]


class SimulatorMode(TorchDispatchMode):
    """A dispatch mode of the simulator: tracked, so uninstalling can take off any a failed test left on."""

    def __enter__(self):  # type: ignore[no-untyped-def]
        result = super().__enter__()
        current()._thread.__dict__.setdefault("modes", []).append(self)
        return result

    def __exit__(self, exc_type, exc, tb):  # type: ignore[no-untyped-def]
        modes = current()._thread.__dict__.get("modes", [])
        if self in modes:
            modes.remove(self)
        return super().__exit__(exc_type, exc, tb)

    @staticmethod
    def exit_all(sim: "SimulatorState") -> None:
        """Pop every simulator mode still on this thread's stack, top first (a test that failed mid-capture,
        or torch_npu's own mode that a failing ``torch.npu.graph`` left pushed)."""
        modes = sim._thread.__dict__.get("modes", [])
        while modes:
            mode = modes[-1]
            try:
                mode.__exit__(None, None, None)
            except Exception:
                if mode in modes:
                    modes.remove(mode)


_active: SimulatorState | None = None


def current() -> SimulatorState:
    if _active is None:
        raise SimulatorError("the npu simulator is not installed (objects of an uninstalled simulator cannot be used)")
    return _active


def activate(state: SimulatorState | None) -> None:
    global _active
    _active = state
