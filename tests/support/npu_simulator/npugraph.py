"""SIMULATED ``torch.npu.NPUGraph`` and ``torch.npu.graph(...)``, as torch_npu 7.1 to 26.0 behave.

``NPUGraph`` follows the C++ ``NPUGraph`` (torch_npu/csrc/core/npu/NPUGraph.cpp at v26.0.0; the same order at
v7.1.0) and its Python wrapper (torch_npu/npu/graphs.py):

- ``capture_begin(pool=None, capture_error_mode="global")``: the TASK_QUEUE_ENABLE check, "already owns a
  captured graph", the non-default-stream check; then the caching allocator starts routing this device's
  allocations into the pool (``beginAllocateToPool``: "already recording to mempool_id" if a capture routes
  into it already); then ``AclmdlRICaptureBegin``. A failure after the routing began leaves it on.
- ``capture_end()``: "Capture must end on the same stream it began on"; ``AclmdlRICaptureEnd`` (the stream
  stops capturing, whether it succeeds or not); on its error it throws *before* ``endAllocateToPool``, so the
  routing stays on (L247-249; master reorders this). A capture ended inside an open task group fails there.
- ``reset()``: releases the graph only when a capture succeeded; the Python wrapper never clears the dispatch
  mode's records.
- ``update(cpu_update_input)``: RuntimeError unless captured with ``auto_dispatch_capture``; otherwise the
  dispatch mode's ``update_capture_record`` (``auto_dispatch``, ``npugraph_handlers``).

``graph`` follows torch_npu's context manager at every line: ``__init__`` makes a class-level default capture
stream and sets ``npu_graph.auto_dispatch_capture``; ``__enter__`` synchronizes, runs ``gc.collect()``
(7.1/7.2; counted, not run) and ``empty_cache()``, enters the stream, pushes the dispatch mode when
``auto_dispatch_capture``, then calls ``capture_begin``; ``__exit__`` calls ``capture_end`` first, then pops the
mode, then leaves the stream, with no try/finally (L308-318 at v7.1.0, L386-400 at v7.3.0, L522-536 at
v26.0.0). So a failing ``capture_begin`` or ``capture_end`` leaves the mode pushed and the stream current, as
on hardware. The simulator rejects values a call written for ``torch.cuda.graph`` would put in the wrong place
(its parameters are ordered differently).
"""

from __future__ import annotations

import os

from typing import Any

from support.npu_simulator import state
from support.npu_simulator.auto_dispatch import GraphDispatchMode
from support.npu_simulator.capture import SimGraph
from support.npu_simulator.npugraph_handlers import RegistryGraphDispatchMode
from support.npu_simulator.streams import Stream, StreamContext

CAPTURE_ERROR_MODES = ("global", "thread_local", "relaxed")


class NPUGraph:
    """A simulated ``torch.npu.NPUGraph``."""

    def __init__(self) -> None:
        sim = state.current()
        mode = RegistryGraphDispatchMode if sim.profile.has_handler_registry else GraphDispatchMode
        self.graph_dispatch_mode = mode()
        self.auto_dispatch_capture = False
        self._graph = SimGraph()
        self._mempool: Any = None
        self._device: int | None = None

    def capture_begin(self, pool: Any = None, capture_error_mode: str = "global") -> None:
        _check_error_mode(capture_error_mode)
        sim = state.current()
        sim.take_fault("capture_begin_check")
        if os.environ.get("TASK_QUEUE_ENABLE", "").strip() == "2":  # NPUGraph.cpp L163-167 at v26.0.0, every line
            raise RuntimeError("Do not support TASK_QUEUE_ENABLE = 2 during NPU graph capture")
        if self._graph.captured:
            raise RuntimeError(
                "This NPUGraph instance already owns a captured graph. To capture a new graph, create a new instance."
            )
        current = sim.current_stream()
        if current is sim.default_stream(current.device_index):
            raise RuntimeError("NPU graphs must be captured on a non-default stream.")
        mempool = pool if pool is not None else sim.new_pool_id(user_created=False)
        sim.begin_allocate_to_pool(current.device_index, mempool)
        self._mempool, self._device = mempool, current.device_index
        sim.take_fault("capture_begin")  # AclmdlRICaptureBegin failed: the routing above stays on
        self._graph.begin(current, mempool)

    def capture_end(self) -> None:
        sim = state.current()
        if self._graph.capture_stream is None or sim.current_stream() is not self._graph.capture_stream:
            raise RuntimeError("Capture must end on the same stream it began on.")
        if "capture_end" in sim.faults:
            self._graph.stop()
            sim.take_fault("capture_end")  # raises before endAllocateToPool: the routing stays on
        self._graph.end()  # inside an open task group this fails too, before endAllocateToPool
        sim.end_allocate_to_pool(self._device, self._mempool)

    def replay(self) -> None:
        self._graph.replay()

    def reset(self) -> None:
        # Only a graph whose capture succeeded holds anything to release (NPUGraph::reset, has_graph_exec_);
        # the dispatch mode's records are never cleared (graphs.py L227-229 at v7.1.0 ... L642-645 on master).
        if self._graph.capture_stream is None or self._graph.capture_stream.capturing is not self._graph:
            self._graph.reset()

    def pool(self) -> Any:
        if not self._graph.captured:
            raise RuntimeError("Called NPUGraph::pool() without a preceding successful capture.")
        return self._mempool

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
        sim = state.current()
        default_stream = sim.class_attributes.setdefault("default_capture_stream", Stream())
        self.pool = () if pool is None else (pool,)
        self.capture_stream = stream if stream is not None else default_stream
        self.stream_ctx = StreamContext(self.capture_stream)
        self.npu_graph = npu_graph
        self.capture_error_mode = capture_error_mode
        npu_graph.auto_dispatch_capture = auto_dispatch_capture

    def __enter__(self) -> None:
        sim = state.current()
        npu = sim.namespace  # looked up at call time, as torch_npu calls torch.npu.empty_cache()
        npu.synchronize()
        if not sim.profile.infra_mode:  # 7.1/7.2 always collect; 7.3 on only with force_npugraph_gc
            sim.gc_collects += 1
        npu.empty_cache()
        self.stream_ctx.__enter__()
        if self.npu_graph.auto_dispatch_capture:
            self.npu_graph.graph_dispatch_mode.__enter__()
        self.npu_graph.capture_begin(*self.pool, capture_error_mode=self.capture_error_mode)

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        self.npu_graph.capture_end()
        if self.npu_graph.auto_dispatch_capture:
            self.npu_graph.graph_dispatch_mode.__exit__(exc_type, exc, tb)
        self.stream_ctx.__exit__(exc_type, exc, tb)


def _check_error_mode(mode: Any) -> None:
    if mode not in CAPTURE_ERROR_MODES:
        raise ValueError(f"capture_error_mode must be one of {', '.join(CAPTURE_ERROR_MODES)}, got {mode!r}")
