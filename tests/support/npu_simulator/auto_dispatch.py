"""SIMULATED ``auto_dispatch_capture``: torch_npu's capture dispatch mode and ``NPUGraph.update``, per line.

While a graph captures inside ``torch.npu.graph(..., auto_dispatch_capture=True)``, torch_npu's
``_GraphDispatchMode`` (torch_npu/npu/graphs.py) brackets the ops it handles: on the current stream an
ExternalEvent wait and reset, the call prepared (FIA ``.default`` swapped to ``.out`` with a workspace and
outputs allocated), ``graph_task_group_begin``, the call, ``graph_task_group_end``, then a record (event,
handle, arguments as weak aliases or deep copies, the op). ``NPUGraph.update(cpu_update_input)`` takes one
dict per record (a single dict is copied to every record) and per record, on the mode's update stream:
``graph_task_update_begin``, the values written in, the op re-issued, ``graph_task_update_end``,
``event.record``. Nothing orders the update after earlier replays.

What each line handles and how it writes the values in (the profile's ``dispatch``):

- "7.1" (v7.1.0-pytorch2.6.0 L136-175): ``func.__name__ == "npu_fused_infer_attention_score"`` (L138), which
  an OpOverload never is (its name is ``"<op>.default"``), and ``== "npu_fused_infer_attention_score.out"``
  (L159): only ``.out`` is handled. Update (L104-118): every key written into the record's kwargs; the
  record-count check compares the count with itself (L108), so with no records ``update`` does nothing.
- "7.2" (v7.2.0-pytorch2.7.1, also 2.8.0): as 7.1, plus ``.default`` (L138).
- "7.2-pt2.6" (v7.2.0-pytorch2.6.0): as 7.2, plus ``_npu_paged_attention`` bracketed as called (L184-197);
  its update sets ``args[-2] = update_input["context_lens"]`` and re-issues ``op(*args)`` without the
  kwargs (L114-120).
- "7.3" (v7.3.0-pytorch2.9.0 L158-248): FIA v1 and v2 ``.default`` (swapped with ``_infer_output``), their
  ``.out``, ``_npu_paged_attention.default``. Update (L112-139): only keys already in kwargs overwritten,
  then ``args[position] = update_input[key]`` by op (PA: 7, ``context_lens``) with no check that the key is
  there. Records weak-alias npu tensors only (L141-156). An infra mode (L100-102).
- "registry" (26.0): ``npugraph_handlers``.
"""

from __future__ import annotations

import re
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any

import torch

from support.npu_simulator import capture, kernels, state
from support.npu_simulator.streams import ExternalEvent, Stream, stream
from support.npu_simulator.weak_refs import MemoryRef, resolved, weak_ref_tensor

FIA = "npu_fused_infer_attention_score"
FIA_V2 = "npu_fused_infer_attention_score_v2"
PA = "_npu_paged_attention"

# What each 7.x line's __torch_dispatch__ matches, by func.__name__: swapped to .out, bracketed as called and
# returning kwargs["out"], bracketed as called and returning the op's result.
_SWAPPED = {
    "7.1": {FIA: FIA},
    "7.2": {FIA: FIA, f"{FIA}.default": FIA},
    "7.2-pt2.6": {FIA: FIA, f"{FIA}.default": FIA},
    "7.3": {FIA: FIA, f"{FIA}.default": FIA, FIA_V2: FIA_V2, f"{FIA_V2}.default": FIA_V2},
}
_OUT_AS_CALLED = {
    "7.1": {f"{FIA}.out"},
    "7.2": {f"{FIA}.out"},
    "7.2-pt2.6": {f"{FIA}.out"},
    "7.3": {f"{FIA}.out", f"{FIA_V2}.out"},
}
_RESULT_AS_CALLED = {
    "7.1": set(),
    "7.2": set(),
    "7.2-pt2.6": {f"{PA}.default", PA},
    "7.3": {f"{PA}.default", "npu_multi_head_latent_attention.out"},
}
# 7.3's update: which positional argument carries which update key, by op (graphs.py L125-134 at v7.3.0).
_POSITIONS_7_3 = {
    FIA: (6, "actual_seq_lengths_kv"),
    f"{FIA}.out": (6, "actual_seq_lengths_kv"),
    FIA_V2: (8, "actual_seq_kvlen"),
    f"{FIA_V2}.out": (8, "actual_seq_kvlen"),
    f"{PA}.default": (7, "context_lens"),
    "npu_multi_head_latent_attention.out": (5, "context_lens"),
}
# The keyword arguments 7.3 passes to the _infer_output helpers (L168-178, L196-206).
INFER_OUTPUT_KEYS = {
    FIA: ("input_layout", "quant_scale2", "block_table", "num_heads", "num_key_value_heads", "softmax_lse_flag", "query_rope"),
    FIA_V2: (
        "input_layout", "quant_scale_out", "block_table", "num_query_heads", "num_key_value_heads",
        "return_softmax_lse", "query_rope",
    ),
}


@dataclass
class GraphDispatchRecord:
    """``_GraphDispatchRecord`` (graphs.py L77-85 at v7.1.0)."""

    event: ExternalEvent
    handle: Any
    kwargs: dict[str, Any] = field(default_factory=dict)
    args: Any = ()  # a tuple on 7.1/7.2, a list from 7.3
    op_cache_entry: Any = None


def torch_npu() -> Any:
    return state.current().torch_npu


def is_npu_tensor(func: Any, name: str, value: Any) -> bool:
    """``"npu" in str(t.device)`` as the simulator sees it: its npu tensors live on the CPU, so every tensor is
    an npu tensor except the host arguments of its kernels (``context_lens``)."""
    return isinstance(value, torch.Tensor) and name not in kernels.host_arguments(func)


class GraphDispatchMode(state.SimulatorMode):
    """torch_npu's ``_GraphDispatchMode``, one per NPUGraph; the line is the installed profile's."""

    def __init__(self) -> None:
        super().__init__()
        sim = state.current()
        self.graph_dispatch_records: list[GraphDispatchRecord] = []
        if sim.profile.shared_update_stream:
            # 7.3 on: __new__ makes one class-level stream at the first NPUGraph() (L92-95 at v7.3.0).
            sim.class_attributes.setdefault("update_stream", Stream())
        else:
            # 7.1/7.2: every mode makes its own in __init__ (L92-95 at v7.1.0).
            self._own_update_stream = Stream()

    @property
    def update_stream(self) -> Stream:
        sim = state.current()
        return sim.class_attributes["update_stream"] if sim.profile.shared_update_stream else self._own_update_stream

    @classmethod
    def is_infra_mode(cls) -> bool:
        sim = state._active
        return bool(sim is not None and sim.profile.infra_mode)

    @property
    def _line(self) -> str:
        return state.current().profile.dispatch

    # --- capture ------------------------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = dict(kwargs or {})
        name = func.__name__
        line = self._line
        if name in _SWAPPED[line]:
            return self._capture_swapped(func, _SWAPPED[line][name], args, kwargs)
        if name in _OUT_AS_CALLED[line]:
            self._capture(func, args, kwargs)
            return kwargs["out"]
        if name in _RESULT_AS_CALLED[line]:
            result = self._capture(func, args, kwargs)
            return None if line == "7.2-pt2.6" else result
        return func(*args, **kwargs)

    def _capture_swapped(self, func: Any, op: str, args: Any, kwargs: dict[str, Any]) -> Any:
        module = torch_npu()
        func_out = getattr(module, op).out
        workspace = getattr(module, f"_{op}_get_max_workspace")(*args, **kwargs)
        if self._line == "7.3":
            keys = INFER_OUTPUT_KEYS[op]
            output, lse = getattr(module, f"_{op}_infer_output")(args[0], args[2], **{k: kwargs[k] for k in keys if k in kwargs})
        else:  # 7.1/7.2 (L147-148)
            output = torch.empty_like(args[0])
            lse = torch.empty(1, dtype=args[0].dtype, device=args[0].device)
        kwargs["workspace"] = workspace
        kwargs["out"] = [output, lse]
        self._capture(func_out, args, kwargs)
        return kwargs["out"]

    def _capture(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        sim = state.current()
        current = sim.current_stream()
        event = ExternalEvent()
        event.wait(current)
        event.reset(current)
        capture.graph_task_group_begin(current)
        result = func(*args, **kwargs)
        handle = capture.graph_task_group_end(current)
        self.graph_dispatch_records.append(self._record(event, handle, args, kwargs, func))
        return result

    def _record(self, event: Any, handle: Any, args: Any, kwargs: dict[str, Any], func: Any) -> GraphDispatchRecord:
        """``_append_dispatch_record``: weak aliases and deep copies, never the tensors themselves."""
        weak_npu_only = state.current().profile.weak_npu_tensors_only
        names = [argument.name for argument in func._schema.arguments]
        args_ref: list[Any] = []
        for index, element in enumerate(args):
            is_tensor = isinstance(element, torch.Tensor)
            weak = is_tensor and (not weak_npu_only or is_npu_tensor(func, names[index], element))
            args_ref.append(weak_ref_tensor(element) if weak else deepcopy(element))
        tensor_names = tensor_argument_names(func, weak_npu_only)
        kwargs_ref: dict[str, Any] = {}
        for key, value in kwargs.items():
            if key == "out":
                kwargs_ref[key] = [weak_ref_tensor(value[0]), weak_ref_tensor(value[1])]
            elif key in tensor_names and value is not None:
                kwargs_ref[key] = weak_ref_tensor(value)
            else:
                kwargs_ref[key] = deepcopy(value)
        stored = list(args_ref) if weak_npu_only else tuple(args_ref)  # 7.3 keeps a list (L156)
        return GraphDispatchRecord(event, handle, kwargs_ref, stored, func)

    # --- update -------------------------------------------------------------------------------------------

    def update_capture_record(self, cpu_update_input: list[dict[str, Any]]) -> None:
        records = self.graph_dispatch_records
        if len(cpu_update_input) == 1:
            cpu_update_input = [dict(cpu_update_input[0]) for _ in records]
        # 7.x compare len(records) with itself here (L108 at v7.1.0): never raises, so nothing is checked.
        update_stream = self.update_stream
        with stream(update_stream):
            for record, update_input in zip(records, cpu_update_input):
                capture.graph_task_update_begin(update_stream, record.handle)
                self._reissue(record, update_input)
                capture.graph_task_update_end(update_stream)
                record.event.record(update_stream)

    def _reissue(self, record: GraphDispatchRecord, update_input: dict[str, Any]) -> None:
        op = record.op_cache_entry
        where = f"torch_npu {self._line}'s NPUGraph.update of {op}"
        line = self._line
        if line == "7.3":
            for key in update_input:
                if key in record.kwargs:
                    record.kwargs[key] = update_input[key]
            position, key = _POSITIONS_7_3[op.__name__]
            if len(record.args) >= position + 1:
                record.args[position] = update_input[key]  # KeyError when the dict lacks it (L135)
            op(*resolved(record.args, where), **resolved(record.kwargs, where))
        elif line == "7.2-pt2.6" and op.__name__ in (f"{PA}.default", PA):
            args = list(record.args)
            if len(args) >= 2:  # "context_lens is the second to last parameter" (L116-119); kwargs dropped
                args[-2] = update_input["context_lens"]
                op(*resolved(args, where))
            else:
                for key in update_input:
                    record.kwargs[key] = update_input[key]
                    op(*resolved(record.args, where), **resolved(record.kwargs, where))
        elif line == "7.2-pt2.6" and op.__name__ not in (FIA, f"{FIA}.out"):
            return  # no branch re-issues it (L111-129)
        else:  # 7.1, 7.2, and FIA on 7.2-pt2.6 (L114-116)
            for key in update_input:
                record.kwargs[key] = update_input[key]
            op(*resolved(record.args, where), **resolved(record.kwargs, where))


def tensor_argument_names(func: Any, from_7_3: bool) -> list[str]:
    """``update_schema``'s regex over the schema (L96-101 at v7.1.0; L104-109 at v7.3.0)."""
    cache = state.current().class_attributes.setdefault("tensor_schema_name", {})
    if func.__name__ not in cache:
        pattern = r"Tensor(?:\(a!\)|\?)?\s+(\w+)" if from_7_3 else r"(?:Tensor\??\s*)(\w+)"
        cache[func.__name__] = re.findall(pattern, str(func._schema))
    return cache[func.__name__]


__all__ = ["GraphDispatchMode", "GraphDispatchRecord", "MemoryRef", "is_npu_tensor", "tensor_argument_names"]
