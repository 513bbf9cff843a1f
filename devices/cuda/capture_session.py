"""Capturing into a ``torch.cuda.CUDAGraph`` the way a server needs it.

``torch.cuda.graph`` empties the allocator's cache on every entry, and before torch 2.9 it also ran
``gc.collect()`` on every entry; from 2.9 it collects only under
``torch.compiler.config.force_cudagraph_gc`` (``TORCH_CUDAGRAPH_GC=1``; pytorch PR 158193, which measured 53
of vLLM's 78 s of capture in those collections). A runner captures dozens of buckets in a row, so that costs
seconds per startup where it still collects and, worse, emptying the cache hands cached blocks back to the
driver between captures that share a pool. This session does only what a capture needs.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from devices.cuda.cuda_graph import CudaGraph

# "thread_local" rejects unsafe CUDA calls made by this thread during capture but leaves other threads
# alone: a server's background threads (NCCL watchdog, tokenizer workers touching CUDA) must not invalidate
# a capture they have nothing to do with, which the default "global" mode would do.
CAPTURE_ERROR_MODE = "thread_local"

def _clear_blas_workspaces() -> None:
    """Drop torch's cached cuBLAS workspaces, so that the next matmul allocates a workspace where it runs.

    torch keeps one cuBLAS workspace per (handle, stream), 32 MiB on an H100, allocated on the first matmul
    and reused after. Cleared before a capture, the captured matmuls allocate theirs inside the capture, in
    the graph's pool: every graph owns the workspace it replays with, and every identical runner's pool holds
    the same bytes. Cleared after it, no eager matmul later works in pool memory that the pool's other graphs
    use too. torch.compile's cudagraph trees do both for their own captures (``clear_cublas_manager``), and
    that clearing is why a workspace made outside a capture is unsafe: a graph that had captured one, made
    for the capture stream in ordinary memory, replayed into memory the allocator had handed back after
    a reduce-overhead compile cleared it (an illegal memory access in ``graphhal bench`` on an H100, torch
    2.11).
    """
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()


class CudaCaptureSession:
    """Context manager: everything issued on this thread inside is recorded into ``graph``."""

    def __init__(self, graph: CudaGraph, pool: Any, stream: torch.cuda.Stream | None) -> None:
        graph.check_capturable()
        self._owner = graph
        self._graph = graph.cuda_graph
        self._pool = pool
        self._stream = stream if stream is not None else torch.cuda.Stream()
        self._stream_context: Any = None

    def __enter__(self) -> CudaGraph:
        # Work queued before the capture (static-input copies, warm-up) must finish first: the capture
        # stream does not wait on other streams by itself. That covers collectives too: a warm-up's NCCL
        # all-reduce is complete (on every rank, since it completes only when all took part) before this
        # stream records the captured one (vLLM's graph_capture makes its capture stream wait on the current
        # stream for the same reason).
        torch.cuda.synchronize(self._stream.device)
        _clear_blas_workspaces()
        self._stream_context = torch.cuda.stream(self._stream)
        self._stream_context.__enter__()
        try:
            self._graph.capture_begin(pool=self._pool, capture_error_mode=CAPTURE_ERROR_MODE)
        except BaseException:
            self._stream_context.__exit__(None, None, None)
            raise
        return self._owner

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        try:
            with warnings.catch_warnings():
                if exc_type is not None:  # torch warns that a capture cut short is empty: we know, we drop it
                    warnings.simplefilter("ignore", UserWarning)
                self._graph.capture_end()
        except Exception:
            self._recover_from_failed_end()
            self._discard()
            if exc_type is None:
                raise
            # The body already failed, which usually invalidated the capture too; its error is the one
            # that explains what happened, so let it propagate and drop this one.
            return
        finally:
            self._stream_context.__exit__(None, None, None)
            _clear_blas_workspaces()
        if exc_type is not None:
            self._discard()
            return
        self._owner.captured = True

    def _recover_from_failed_end(self) -> None:
        """Undo what a capture_end that raised left behind, so the device stays usable.

        When the driver refuses to end a capture (unjoined side-stream work, an invalidated capture),
        torch's capture_end raises before it stops routing this stream's allocations into the pool and
        before it takes the RNG generators out of capture mode; the next eager ``torch.randn`` would then
        fail with "Offset increment outside graph capture". Ending the pool routing and running one empty
        capture on the same stream restores both.
        """
        device_index = self._stream.device.index
        try:
            torch._C._cuda_endAllocateToPool(device_index, self._graph.pool())
        except Exception:  # already ended: nothing to undo
            pass
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the empty-graph warning
            settle = torch.cuda.CUDAGraph()
            settle.capture_begin(capture_error_mode=CAPTURE_ERROR_MODE)
            settle.capture_end()
            settle.reset()

    def _discard(self) -> None:
        """Free what a failed capture recorded so nothing half-captured survives."""
        self._graph.reset()
        torch.cuda.synchronize(self._stream.device)
