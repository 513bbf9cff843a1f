"""SIMULATED ``auto_dispatch_capture``: torch_npu 2.14's capture handlers and ``NPUGraph.update``.

torch_npu 2.14 (``torch_npu/npu/graphs.py``, ``_GraphDispatchMode``): while a graph captures with
``auto_dispatch_capture=True``, a dispatch mode looks up each op in a handler registry
(``_npugraph_handlers``, keyed by ``func.__name__``). For a handled op it issues, on the current stream, an
ExternalEvent wait and reset, lets the handler prepare the call (the fused attention switches to its
``.out`` overload with preallocated outputs and workspace), brackets the launch in a task group and keeps a
record (event, handle, arguments). ``NPUGraph.update(cpu_update_input)`` takes one dict per record (a single
dict is copied to every record), and per record, on the mode's update stream: ``graph_task_update_begin``,
the dict's keys written into the record's keyword arguments, the op re-issued, ``graph_task_update_end``,
``event.record(update_stream)``. It does not order itself after earlier replays: that is the caller's job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from support.npu_simulator import capture, kernels, state
from support.npu_simulator.streams import ExternalEvent, stream


class FusedInferAttentionHandler:
    """torch_npu 2.14's IFA v1 handler: ``.default`` becomes ``.out`` with preallocated outputs."""

    @classmethod
    def prepare_capture(cls, func, args, kwargs):  # type: ignore[no-untyped-def]
        out_overload = kernels.ops().npu_fused_infer_attention_score.out
        if func is out_overload:
            return func, args, kwargs
        query = args[0]
        kwargs = dict(kwargs)
        kwargs["workspace"] = kernels.max_workspace(query)
        kwargs["out"] = [torch.empty_like(query), torch.empty(1, dtype=torch.float32, device=query.device)]
        return out_overload, args, kwargs

    @classmethod
    def postprocess_result(cls, result, kwargs):  # type: ignore[no-untyped-def]
        return kwargs["out"]

    @classmethod
    def update_args(cls, record, update_input):  # type: ignore[no-untyped-def]
        return None  # the simulated op takes its lengths by keyword: the generic kwargs update covers it


# torch_npu's registry: op name as func.__name__ gives it -> handler class.
NPU_GRAPH_OP_HANDLERS = {
    name: FusedInferAttentionHandler
    for name in (
        "npu_fused_infer_attention_score",
        "npu_fused_infer_attention_score.default",
        "npu_fused_infer_attention_score.out",
    )
}


@dataclass
class GraphDispatchRecord:
    event: ExternalEvent
    handle: Any
    func: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


class GraphDispatchMode(state.SimulatorMode):
    """One per NPUGraph, entered while it captures with auto_dispatch_capture=True."""

    def __init__(self) -> None:
        super().__init__()
        self.graph_dispatch_records: list[GraphDispatchRecord] = []

    @property
    def update_stream(self) -> Any:
        return state.current().auto_update_stream

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        handler = NPU_GRAPH_OP_HANDLERS.get(func.__name__)
        if handler is None:
            return func(*args, **kwargs)
        current = state.current().current_stream()
        event = ExternalEvent()
        event.wait(current)
        event.reset(current)
        func, args, kwargs = handler.prepare_capture(func, args, kwargs)
        capture.graph_task_group_begin(current)
        result = func(*args, **kwargs)
        handle = capture.graph_task_group_end(current)
        recorded = {key: kernels.copy_host_value(value) if not isinstance(value, torch.Tensor) else value for key, value in kwargs.items()}
        self.graph_dispatch_records.append(GraphDispatchRecord(event, handle, func, tuple(args), recorded))
        return handler.postprocess_result(result, kwargs)

    def update_capture_record(self, cpu_update_input: list[dict[str, Any]]) -> None:
        records = self.graph_dispatch_records
        if len(cpu_update_input) == 1:
            cpu_update_input = [dict(cpu_update_input[0]) for _ in records]
        if len(cpu_update_input) != len(records):
            raise RuntimeError(
                f"Currently, there are {len(records)} operators that need to be updated by capture, and there are "
                f"only {len(cpu_update_input)} elements in the incoming cpu_update_input list"
            )
        update_stream = self.update_stream
        with stream(update_stream):
            for record, update_input in zip(records, cpu_update_input):
                capture.graph_task_update_begin(update_stream, record.handle)
                for key, value in update_input.items():
                    if key in record.kwargs:
                        record.kwargs[key] = value
                NPU_GRAPH_OP_HANDLERS[record.func.__name__].update_args(record, update_input)
                record.func(*record.args, **record.kwargs)
                capture.graph_task_update_end(update_stream)
                record.event.record(update_stream)
