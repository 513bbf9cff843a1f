"""SIMULATED ``torch.npu.NPUGraph`` and ``torch.npu.graph(...)`` (torch_npu 2.14 signatures).

``torch.npu.graph(npu_graph, pool=None, stream=None, auto_dispatch_capture=False, capture_error_mode="global")``
orders its parameters differently from ``torch.cuda.graph``; the simulator rejects the values a call
written for CUDA would put in the wrong place. Entering it synchronizes the device and empties the device
and host caches (as 2.14 does; the simulator counts the flushes) and makes ``stream`` current; with
``auto_dispatch_capture`` the handler mode is active inside (``auto_dispatch``). One difference in how it is
built, not in what it does: the simulator starts the capture before entering the handler mode, because its
capture is itself a dispatch mode and must sit below torch_npu's Python-level modes, as the stream capture
sits below them on hardware.
"""

from __future__ import annotations

from typing import Any

from support.npu_simulator import state
from support.npu_simulator.auto_dispatch import GraphDispatchMode
from support.npu_simulator.capture import SimGraph
from support.npu_simulator.streams import Stream, stream

CAPTURE_ERROR_MODES = ("global", "thread_local", "relaxed")


class NPUGraph:
    """A simulated ``torch.npu.NPUGraph``."""

    def __init__(self) -> None:
        state.current()
        self.graph_dispatch_mode = GraphDispatchMode()
        self.auto_dispatch_capture = False
        self._graph = SimGraph()

    def capture_begin(self, pool: Any = None, capture_error_mode: str = "global") -> None:
        _check_error_mode(capture_error_mode)
        self._graph.begin(state.current().current_stream(), pool)

    def capture_end(self) -> None:
        self._graph.end()

    def replay(self) -> None:
        self._graph.replay()

    def reset(self) -> None:
        self._graph.reset()
        self.graph_dispatch_mode.graph_dispatch_records.clear()

    def pool(self) -> Any:
        return self._graph.pool

    def update(self, cpu_update_input: list[dict[str, Any]]) -> None:
        if not self.auto_dispatch_capture:
            raise RuntimeError(
                "The current graph configuration does not support update,"
                "Try to capture by setting auto_dispatch_capture=True during capture"
            )
        self.graph_dispatch_mode.update_capture_record(cpu_update_input)

    @property
    def simulated(self) -> SimGraph:
        """The simulator's view of the recorded work (for tests)."""
        return self._graph


class graph:  # noqa: N801 - torch_npu's name
    """A simulated ``torch.npu.graph`` context manager."""

    def __init__(
        self,
        npu_graph: NPUGraph,
        pool: Any = None,
        stream: Stream | None = None,
        auto_dispatch_capture: bool = False,
        capture_error_mode: str = "global",
    ) -> None:
        if not isinstance(npu_graph, NPUGraph):
            raise TypeError(f"torch.npu.graph needs an NPUGraph, got {type(npu_graph).__name__}")
        if stream is not None and not isinstance(stream, Stream):
            raise TypeError(
                f"torch.npu.graph: stream must be a torch.npu.Stream, got {stream!r}; its parameters are (npu_graph, "
                "pool, stream, auto_dispatch_capture, capture_error_mode): pass them by keyword"
            )
        if not isinstance(auto_dispatch_capture, bool):
            raise TypeError(
                f"torch.npu.graph: auto_dispatch_capture must be a bool, got {auto_dispatch_capture!r}; its parameters "
                "are (npu_graph, pool, stream, auto_dispatch_capture, capture_error_mode): pass them by keyword"
            )
        _check_error_mode(capture_error_mode)
        self.npu_graph = npu_graph
        self.pool = pool
        self.capture_stream = stream if stream is not None else Stream()
        self.capture_error_mode = capture_error_mode
        npu_graph.auto_dispatch_capture = auto_dispatch_capture
        self._stream_context: Any = None

    def __enter__(self) -> None:
        sim = state.current()
        npu = sim.namespace  # looked up at call time, as torch_npu calls torch.npu.empty_cache()
        npu.synchronize()
        npu.empty_cache()
        npu.host_empty_cache()
        self._stream_context = stream(self.capture_stream)
        self._stream_context.__enter__()
        self.npu_graph.capture_begin(self.pool, capture_error_mode=self.capture_error_mode)
        if self.npu_graph.auto_dispatch_capture:
            self.npu_graph.graph_dispatch_mode.__enter__()

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        try:
            if self.npu_graph.auto_dispatch_capture:
                self.npu_graph.graph_dispatch_mode.__exit__(exc_type, exc, tb)
            self.npu_graph.capture_end()
        finally:
            self._stream_context.__exit__(exc_type, exc, tb)


def _check_error_mode(mode: Any) -> None:
    if mode not in CAPTURE_ERROR_MODES:
        raise ValueError(f"capture_error_mode must be one of {', '.join(CAPTURE_ERROR_MODES)}, got {mode!r}")
