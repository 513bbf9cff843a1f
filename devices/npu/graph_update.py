"""``hal_update`` for npu graphs: new host lengths into every attention launch of a graph, in order.

The ordering (why each update waits for the graph's previous replay) is explained in ``npu_graph``. On the
plugin's update stream for the graph's device, per launch: ``graph_task_update_begin(stream, handle)``, the
op re-issued on the captured memory and workspace with the new lengths (in the types its schema takes; a
packed prefill launch gets the query lengths as cumulative ends too, ``launch_lengths``),
``graph_task_update_end(stream)``, then ``event.record(stream)`` to release the captured task. vllm-ascend
updates the same way (attention_v1.py update_graph_params, main 182b75ea); torch_npu's ``NPUGraph.update`` is
not used (``capture_session`` says why). The update is asynchronous: the host returns once the re-issued
launches are queued, and the replay launched next overlaps with them up to its first gated attention task.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from devices.npu.host_length_ops import HostLengthUpdateError
from devices.npu.npu_graph import NpuGraph
from hal import GraphStateError, SlotRole

# SEQ_LENS: the KV lengths every attention launch takes. QUERY_LENS: the new tokens per request of a packed
# prefill batch, which only packed ("TND") launches take (as cumulative ends, ``launch_lengths``); a graph
# whose launches take none (decode) ignores it.
SUPPORTED_PARAMS = (SlotRole.SEQ_LENS, SlotRole.QUERY_LENS)


def update_graph(graph: NpuGraph, params: Mapping[str, Any]) -> None:
    """Give every host-length launch of ``graph`` the lengths in ``params``, before its next replay."""
    if not graph.captured:
        raise GraphStateError(
            f"update of an npu:{graph.index} graph that was never captured (or whose capture failed): capture it "
            "first (Device.capture_session), or make a new graph and capture that"
        )
    lengths = _lengths(graph, params)
    if lengths is None:  # nothing in this graph bakes lengths (e.g. a breakable graph's segment): no-op
        return
    seq_lens, query_lens = lengths
    # Host values ready before any update begins (a misfit raises here, with nothing half-updated).
    calls = [launch.call_with(seq_lens, query_lens) for launch in graph.launches]
    npu = graph.runtime.npu
    stream = graph.runtime.update_stream(graph.index)
    _after_previous_replay(graph, stream)
    with npu.stream(stream):
        for launch, (args, kwargs) in zip(graph.launches, calls):
            npu.graph_task_update_begin(stream, launch.handle)
            try:
                launch.reissue(args, kwargs)
            except BaseException:
                _end_failed_update(npu, stream)
                raise  # update_pending stays False: replaying now is refused (MissingUpdateError)
            npu.graph_task_update_end(stream)
            launch.event.record(stream)  # releases the captured task, and only after its update
    graph.update_pending = True


def _lengths(graph: NpuGraph, params: Mapping[str, Any]) -> tuple[list[int], list[int] | None] | None:
    """The update's ``seq_lens`` and (for packed launches) ``query_lens``, checked against the graph; None when
    the graph holds no host-length launch."""
    unknown = sorted(set(params) - set(SUPPORTED_PARAMS))
    if unknown:
        raise HostLengthUpdateError(
            f"npu graphs take no update parameter(s) {', '.join(map(repr, unknown))}; "
            f"supported: {', '.join(SUPPORTED_PARAMS)}"
        )
    if graph.batch is None:
        return None
    batches = sorted({launch.batch for launch in graph.launches})
    if len(batches) > 1:
        raise HostLengthUpdateError(
            f"this npu graph's attention launches were captured for different request counts ({batches}); one "
            f"{SlotRole.SEQ_LENS!r} list cannot update them all"
        )
    seq_lens = _host_ints(graph, params, SlotRole.SEQ_LENS)
    packed = any(launch.lengths.takes_query_lens for launch in graph.launches)
    return seq_lens, _host_ints(graph, params, SlotRole.QUERY_LENS) if packed else None


def _host_ints(graph: NpuGraph, params: Mapping[str, Any], role: str) -> list[int]:
    """``params[role]``: a host list of ``graph.batch`` non-negative ints."""
    if role not in params:
        packed = " of packed prefill tokens" if role == SlotRole.QUERY_LENS else ""
        raise HostLengthUpdateError(
            f"this npu graph holds {len(graph.launches)} attention launch(es){packed} taking host lengths; the update "
            f"must give {role!r} ({graph.batch} ints, padded with 0)"
        )
    values = params[role]
    if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
        raise HostLengthUpdateError(
            f"{role!r} must be a host list of ints, got {type(values).__name__}: a device tensor would have to be "
            "read back to the host, which is the caller's choice to make, not the graph's"
        )
    if len(values) != graph.batch:
        raise HostLengthUpdateError(
            f"{role!r} has {len(values)} lengths but this npu graph was captured for {graph.batch} requests; pad "
            "the live lengths to the graph's bucket (with 0)"
        )
    lengths = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise HostLengthUpdateError(f"{role!r} must hold non-negative ints, got {value!r}")
        lengths.append(value)
    return lengths


def _end_failed_update(npu: Any, stream: Any) -> None:
    """Close the update a failing re-issue left open, so the stream can update again; its error is the one
    raised (torch_npu's NPUGraph.update leaves the stream inside the update, graphs.py L294-322 at v26.0.0)."""
    try:
        npu.graph_task_update_end(stream)
    except Exception:  # an update that re-issued nothing may be refused: the re-issue's error says more
        pass


def _after_previous_replay(graph: NpuGraph, stream: Any) -> None:
    """Order what is issued next on ``stream`` after the graph's previous replay (``npu_graph``)."""
    if graph.replayed_event is not None:  # never replayed: nothing can still be reading its tasks
        stream.wait_event(graph.replayed_event)
