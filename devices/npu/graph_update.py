"""``hal_update`` for npu graphs: new host lengths into every attention launch of a graph, in order.

The ordering (why each update waits for the graph's previous replay) is explained in ``npu_graph``. The
update is asynchronous: the host returns once the re-issued launches are queued on the update streams, and
the replay launched next overlaps with them up to its first gated attention task.

- auto launches (torch_npu has a handler): ``NPUGraph.update(cpu_update_input=[{argument: lengths}])``.
  torch_npu 2.14 broadcasts a one-element list to every recorded launch and issues the update on its own
  update stream, ``NPUGraph.graph_dispatch_mode.update_stream``; that stream is made to wait for the
  previous replay. A torch_npu that keeps the stream elsewhere gets a host-side wait for the previous
  replay instead: still correct, but the host then waits for the device.
- explicit launches: on the plugin's update stream for the device, per launch
  ``graph_task_update_begin(stream, handle)``, the op re-issued with the new lengths,
  ``graph_task_update_end(stream)``, then ``event.record(stream)`` to release the captured task.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from devices.npu.host_length_launches import HostLengthUpdateError
from devices.npu.npu_graph import NpuGraph
from hal import SlotRole

SUPPORTED_PARAMS = (SlotRole.SEQ_LENS,)


def update_graph(graph: NpuGraph, params: Mapping[str, Any]) -> None:
    """Give every host-length launch of ``graph`` the lengths in ``params``, before its next replay."""
    if not graph.captured:
        raise RuntimeError("update of an npu graph that was never captured (or whose capture failed)")
    lengths = _lengths(graph, params)
    if lengths is None:  # nothing in this graph bakes lengths (e.g. a breakable graph's segment): no-op
        return
    if graph.auto_launches:
        _update_auto(graph, lengths)
    if graph.explicit_launches:
        _update_explicit(graph, lengths)
    graph.update_pending = True


def _lengths(graph: NpuGraph, params: Mapping[str, Any]) -> list[int] | None:
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
    if SlotRole.SEQ_LENS not in params:
        raise HostLengthUpdateError(
            f"this npu graph holds {len(graph.launches)} attention launch(es) taking host lengths; the update must "
            f"give {SlotRole.SEQ_LENS!r} ({graph.batch} ints, padded with 0)"
        )
    values = params[SlotRole.SEQ_LENS]
    if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
        raise HostLengthUpdateError(
            f"{SlotRole.SEQ_LENS!r} must be a host list of ints, got {type(values).__name__}: a device tensor would "
            "have to be read back to the host, which is the caller's choice to make, not the graph's"
        )
    if len(values) != graph.batch:
        raise HostLengthUpdateError(
            f"{SlotRole.SEQ_LENS!r} has {len(values)} lengths but this npu graph was captured for {graph.batch} "
            "requests; pad the live lengths to the graph's bucket (with 0)"
        )
    lengths = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise HostLengthUpdateError(f"{SlotRole.SEQ_LENS!r} must hold non-negative ints, got {value!r}")
        lengths.append(value)
    return lengths


def _update_auto(graph: NpuGraph, lengths: list[int]) -> None:
    stream = getattr(getattr(graph.npu_graph, "graph_dispatch_mode", None), "update_stream", None)
    _after_previous_replay(graph, stream)
    arguments = {launch.op.argument for launch in graph.auto_launches}
    graph.npu_graph.update(cpu_update_input=[{argument: list(lengths) for argument in arguments}])


def _update_explicit(graph: NpuGraph, lengths: list[int]) -> None:
    npu = graph.runtime.npu
    stream = graph.runtime.update_stream(graph.index)
    _after_previous_replay(graph, stream)
    with npu.stream(stream):
        for launch in graph.explicit_launches:
            npu.graph_task_update_begin(stream, launch.handle)
            launch.reissue(lengths)
            npu.graph_task_update_end(stream)
            launch.event.record(stream)  # releases the captured task, and only after its update


def _after_previous_replay(graph: NpuGraph, stream: Any) -> None:
    """Order what is issued next on ``stream`` after the graph's previous replay (``npu_graph``)."""
    if graph.replayed_event is None:
        return  # never replayed: nothing can still be reading its tasks
    if stream is not None:
        stream.wait_event(graph.replayed_event)
    else:
        graph.replayed_event.synchronize()
