"""The SIMULATED npu device: the state every part of the simulator shares while it is installed."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch.utils._python_dispatch import TorchDispatchMode

from support.npu_simulator.clocks import Clock, joined
from support.npu_simulator.errors import SimulatorError

if TYPE_CHECKING:
    from support.npu_simulator.streams import Stream


@dataclass(frozen=True)
class Launch:
    """One run of a simulated kernel that takes host lengths: when it ran and with which lengths."""

    op: str
    phase: str  # "eager", "capture" or "replay"
    lengths: tuple[int, ...]


@dataclass
class SimulatorState:
    """One installation of the simulator: devices, streams, the host's view of finished work, a launch log."""

    version: str
    device_count: int
    namespace: Any = None  # the simulated torch.npu module, looked up at call time like torch_npu does
    host_clock: Clock = field(default_factory=dict)
    launches: list[Launch] = field(default_factory=list)
    cache_flushes: int = 0  # empty_cache / host_empty_cache calls
    streams: list["Stream"] = field(default_factory=list)
    _next_stream_id: int = 0
    _default_streams: dict[int, "Stream"] = field(default_factory=dict)
    _auto_update_stream: "Stream | None" = None
    _thread: threading.local = field(default_factory=threading.local)

    # --- ids, devices, streams ----------------------------------------------------------------------------

    def add_stream(self, stream: "Stream") -> int:
        """Register a new stream; returns its id."""
        self.streams.append(stream)
        self._next_stream_id += 1
        return self._next_stream_id

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

    @property
    def auto_update_stream(self) -> "Stream":
        """The stream ``NPUGraph.update`` issues on (torch_npu 2.14: one per process, made on first use)."""
        from support.npu_simulator.streams import Stream

        if self._auto_update_stream is None:
            self._auto_update_stream = Stream()
        return self._auto_update_stream

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
    def replaying(self) -> int:
        return getattr(self._thread, "replaying", 0)

    @replaying.setter
    def replaying(self, depth: int) -> None:
        self._thread.replaying = depth

    def host_synchronize(self, clock: Clock) -> None:
        """The host waited until everything in ``clock`` finished."""
        self.host_clock = joined(self.host_clock, clock)

    def log_launch(self, op: str, lengths: list[int]) -> None:
        phase = "capture" if self.capturing_graph is not None else "replay" if self.replaying else "eager"
        self.launches.append(Launch(op, phase, tuple(lengths)))


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
        modes = sim._thread.__dict__.get("modes", [])
        while modes:
            mode = modes[-1]
            try:
                mode.__exit__(None, None, None)
            except Exception:
                modes.remove(mode) if mode in modes else None


_active: SimulatorState | None = None


def current() -> SimulatorState:
    if _active is None:
        raise SimulatorError("the npu simulator is not installed (objects of an uninstalled simulator cannot be used)")
    return _active


def activate(state: SimulatorState | None) -> None:
    global _active
    _active = state
