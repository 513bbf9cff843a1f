"""Capturing into an ``NpuGraph``: the plugin's own capture, so that a failure leaves nothing behind.

The plugin drives ``NPUGraph.capture_begin``/``capture_end`` itself instead of entering ``torch.npu.graph``,
and never turns on ``auto_dispatch_capture``. Both choices come from torch_npu's source (Ascend/pytorch,
torch_npu/npu/graphs.py and torch_npu/csrc/core/npu/NPUGraph.cpp at the tags named):

- ``torch.npu.graph.__exit__`` calls ``capture_end()`` first, then pops its dispatch mode, then leaves the
  capture stream, with no try/finally (L314-318 at v7.1.0, L396-400 at v7.3.0, L532-536 at v26.0.0, L916-931
  on master); ``__enter__`` pushes the mode and enters the stream before ``capture_begin`` (L308-312 at
  v7.1.0). A failing ``capture_begin`` or ``capture_end`` would leave torch_npu's dispatch mode pushed (every
  later eager attention intercepted) and the capture stream current. It also empties the device cache and
  (7.1/7.2) runs ``gc.collect()`` on every entry, which a runner capturing dozens of buckets into one pool
  must not do.
- ``auto_dispatch_capture=True`` hands host-length ops to torch_npu's handlers, which differ per release line
  (issue 16): 7.1 matches only ``npu_fused_infer_attention_score.out`` (graphs.py L138/L159, so ``.default``
  is baked silently and ``NPUGraph.update`` updates nothing); 7.2's PyTorch 2.6 cut brackets
  ``_npu_paged_attention``, its 2.7.1/2.8.0 cuts do not; FIA v2 is handled from 7.3; 26.0 re-issues
  ``_npu_paged_attention`` with whatever the caller passed for a Tensor. Its records hold only weak aliases of
  the workspace and outputs. The plugin brackets every op itself instead (``host_length_launches``), the
  same way on every line, and checks at the end that torch_npu recorded nothing, so no op is ever bracketed
  twice.

Recovery (hal's contract: a failed capture ends the capture and leaves the device usable): the dispatch mode
is popped and the stream left in ``finally``; and where ``capture_begin`` or ``capture_end`` fails after the
caching allocator began routing allocations into the pool, the routing is ended here, since up to 26.0 C++
``capture_end`` throws on ``AclmdlRICaptureEnd``'s error before ``endAllocateToPool`` (NPUGraph.cpp L171-173
at v7.1.0, L247-249 at v26.0.0; master ends it first, L356-371) and ``reset()`` does nothing for a graph
never captured: the next capture into that pool would fail with "already recording to mempool_id".
"""

from __future__ import annotations

import logging
from typing import Any

from devices.npu import stream_budget
from devices.npu.host_length_launches import HostLengthCapture
from devices.npu.npu_graph import NpuGraph
from hal import GraphHalError, GraphStateError

logger = logging.getLogger(__name__)

# As for CUDA: errors only for unsafe calls made by this thread, so a server's background threads cannot
# invalidate a capture they have nothing to do with.
CAPTURE_ERROR_MODE = "thread_local"


class TorchNpuBracketedError(GraphHalError, RuntimeError):
    """torch_npu's own capture dispatch mode recorded launches in a graph the npu device brackets itself."""


class NpuCaptureEndError(GraphHalError, RuntimeError):
    """torch_npu could not end a capture (the driver refused the captured graph)."""


def stream_capture_advice(index: int) -> str:
    """What to check when ending a capture fails: the device's streams, which every graph holds one of.

    Every ACL graph keeps one of the device's about 2,048 streams, with or without collectives (vllm-ascend
    keeps under about 1,800 graphs; its 207008 "resource alloc fail"); ``stream_budget`` counts them and the
    runners fit their buckets to what is left, so a failure here with many graphs alive means other streams
    (another runner, HCCL's own) took the rest. Under an HCCL group, vllm-ascend's graph deployments also set
    HCCL_OP_EXPANSION_MODE=AIV (collectives as AI Vector kernels on the capture stream, not AI CPU tasks).
    """
    import os

    alive = stream_budget.graph_limit() - stream_budget.graphs_left(index)
    advice = (
        f" npu:{index} holds {alive} NPU graphs now; each holds one of the device's about 2,048 streams (graphhal "
        f"lets a process make {stream_budget.graph_limit()}, {stream_budget.LIMIT_VARIABLE}), so if the runtime "
        "reports a resource allocation failure, capture fewer buckets or use mode full (one graph per bucket, "
        "where piecewise and breakable take one per piece)"
    )
    try:
        import torch.distributed as dist

        hccl = dist.is_available() and dist.is_initialized() and "hccl" in str(dist.get_backend())
    except Exception:  # no default group (only subgroups), or no distributed build
        hccl = False
    if hccl and os.environ.get("HCCL_OP_EXPANSION_MODE", "") != "AIV":
        advice += (
            "; under an HCCL group, also set HCCL_OP_EXPANSION_MODE=AIV, as vllm-ascend's graph deployments do "
            "(it is not set here)"
        )
    return advice + "."


class NpuCaptureSession:
    """Context manager: NPU work issued on this thread inside is recorded into ``graph``."""

    def __init__(self, graph: NpuGraph, pool: Any, stream: Any) -> None:
        if graph.captured:
            raise GraphStateError(
                f"this npu:{graph.index} graph is already captured: make a new graph per capture (Device.make_graph)"
            )
        self._graph = graph
        npu = graph.runtime.npu
        # Always a pool the plugin knows, so that a failed capture's routing into it can be ended.
        self._pool = pool if pool is not None else npu.graph_pool_handle()
        self._stream = stream if stream is not None else graph.runtime.capture_stream(graph.index)
        self._stream_context: Any = None
        self._launch_capture: HostLengthCapture | None = None

    def __enter__(self) -> NpuGraph:
        graph = self._graph
        self._stream_context = graph.runtime.npu.stream(self._stream)
        self._stream_context.__enter__()
        try:
            graph.npu_graph.capture_begin(pool=self._pool, capture_error_mode=CAPTURE_ERROR_MODE)
        except BaseException as exc:
            # The pool may be another capture's only when the allocator refused it as such; otherwise a
            # capture_begin failing after beginAllocateToPool (AclmdlRICaptureBegin) leaves the routing on.
            if "already recording" not in str(exc):
                self._end_pool_routing()
            self._stream_context.__exit__(None, None, None)
            graph.discard()
            raise
        # Pushed after capture_begin succeeded, so a failing begin leaves no mode behind.
        self._launch_capture = HostLengthCapture(graph.runtime, graph.launches, graph.workspaces)
        self._launch_capture.__enter__()
        return graph

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        assert self._launch_capture is not None
        graph = self._graph
        try:
            try:
                self._launch_capture.__exit__(None, None, None)
            finally:
                self._end_capture()
            self._check_torch_npu_recorded_nothing()
        except Exception:
            graph.discard()
            if exc_type is None:
                raise
            return  # the body's own error explains the failure better than the aborted capture's
        if exc_type is not None:
            graph.discard()  # nothing half-captured survives
            return
        graph.captured = True

    def _end_capture(self) -> None:
        try:
            self._graph.npu_graph.capture_end()
        except Exception as exc:
            self._end_pool_routing()
            raise NpuCaptureEndError(
                f"ending the capture on npu:{self._graph.index} failed: {type(exc).__name__}: {exc}."
                + stream_capture_advice(self._graph.index)
            ) from exc
        except BaseException:
            self._end_pool_routing()
            raise
        finally:
            self._stream_context.__exit__(None, None, None)

    def _end_pool_routing(self) -> None:
        runtime = self._graph.runtime
        end = runtime.end_allocate_to_pool()
        if end is None:
            logger.warning(
                "graphhal: %s has no binding to end allocation routing into a graph pool; after this failed "
                "capture, capture into a new pool", runtime.build
            )
            return
        try:
            end(self._graph.index, self._pool)
        except Exception as exc:  # "not currently recording to mempool_id": it never began, or already ended
            logger.debug("graphhal: npu pool routing was not active after the failed capture: %s", exc)

    def _check_torch_npu_recorded_nothing(self) -> None:
        mode = getattr(self._graph.npu_graph, "graph_dispatch_mode", None)
        records = list(getattr(mode, "graph_dispatch_records", None) or ())
        if records:
            ops = sorted({str(getattr(record, "op_cache_entry", "?")) for record in records})
            raise TorchNpuBracketedError(
                f"torch_npu's capture dispatch mode recorded {len(records)} launch(es) ({', '.join(ops)}) in a graph "
                f"the npu device captures with auto_dispatch_capture off ({self._graph.runtime.build}); something "
                "turned torch_npu's auto dispatch on inside the capture, and those ops would be bracketed twice"
            )
