"""Capturing into an ``NpuGraph`` through ``torch.npu.graph``, with host-length launches made updatable.

Every keyword is passed by name: ``torch.npu.graph(npu_graph, pool, stream, auto_dispatch_capture,
capture_error_mode)`` orders its parameters differently from ``torch.cuda.graph``, so a positional call
written for CUDA would hand the error mode to ``auto_dispatch_capture``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from devices.npu.host_length_launches import HostLengthCapture
from devices.npu.npu_graph import NpuGraph
from devices.npu.runtime import TorchNpu

# As for CUDA: errors only for unsafe calls made by this thread, so a server's background threads cannot
# invalidate a capture they have nothing to do with.
CAPTURE_ERROR_MODE = "thread_local"


class NpuCaptureSession:
    """Context manager: NPU work issued on this thread inside is recorded into ``graph``."""

    def __init__(self, graph: NpuGraph, pool: Any, stream: Any) -> None:
        if graph.captured:
            raise RuntimeError("this npu graph is already captured; make a new graph per capture")
        self._graph = graph
        self._pool = pool
        self._stream = stream
        self._context: Any = None
        self._launch_capture: HostLengthCapture | None = None

    def __enter__(self) -> NpuGraph:
        runtime = self._graph.runtime
        self._context = runtime.npu.graph(
            self._graph.npu_graph,
            pool=self._pool,
            stream=self._stream,
            auto_dispatch_capture=True,  # torch_npu records its handled ops (fused attention) for NPUGraph.update
            capture_error_mode=CAPTURE_ERROR_MODE,
        )
        with _cache_kept(runtime):
            self._context.__enter__()
        try:
            # Entered after torch.npu.graph, so it sits above torch_npu's dispatch mode and sees ops first.
            self._launch_capture = HostLengthCapture(runtime, self._graph.launches)
            self._launch_capture.__enter__()
        except BaseException:
            self._context.__exit__(None, None, None)
            self._graph.discard()
            raise
        return self._graph

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        assert self._launch_capture is not None
        try:
            self._launch_capture.__exit__(None, None, None)
            self._context.__exit__(exc_type, exc, tb)
        except Exception:
            self._graph.discard()
            if exc_type is None:
                raise
            return  # the body's own error explains the failure better than the aborted capture's
        if exc_type is not None:
            self._graph.discard()  # nothing half-captured survives
            return
        self._graph.captured = True


@contextmanager
def _cache_kept(runtime: TorchNpu) -> Iterator[None]:
    """``torch.npu.graph`` empties the device and host caches on every entry. A runner captures dozens of
    buckets into one pool; emptying per capture costs startup time and hands blocks back between captures
    that share the pool (the rule the cuda plugin keeps by not using torch.cuda.graph). The two calls are
    no-ops while the context is entered; another thread calling them in those microseconds loses nothing."""
    npu = runtime.npu
    saved = {name: getattr(npu, name) for name in ("empty_cache", "host_empty_cache") if hasattr(npu, name)}
    for name in saved:
        setattr(npu, name, _keep_cache)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(npu, name, function)


def _keep_cache(*args: Any, **kwargs: Any) -> None:
    return None
