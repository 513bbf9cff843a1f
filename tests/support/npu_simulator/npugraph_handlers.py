"""SIMULATED torch_npu 26.0 capture dispatch: the handler registry and the template-method mode.

From 26.0 (tag v26.0.0-pytorch2.9.0) torch_npu looks ops up in ``_NPU_GRAPH_OP_HANDLERS``
(torch_npu/npu/_npugraph_handlers/npugraph_handler.py L178, a dict of op name -> handler class) instead of
matching strings (graphs.py L196-232). The handlers simulated (ifa_handler.py, simple_handler.py):

- ``_IFAv1DefaultHandler`` for ``npu_fused_infer_attention_score``, ``.default``, ``.out``: ``.default`` gets
  ``_get_max_workspace`` and ``_infer_output`` and swaps to ``.out``; ``update_args`` sets ``args[6]`` only when
  ``len(args) >= 7`` (never for FIA, whose lengths are keyword-only: the kwargs overwrite carries them).
- ``_IFAv2DefaultHandler`` for the v2 triple (``args[8]``, ``actual_seq_kvlen``).
- ``_SimpleGraphHandler`` for ``_npu_paged_attention.default`` and ``npu_multi_head_latent_attention.out``:
  bracketed as called; ``update_args`` puts ``update_input["context_lens"]`` at ``args[7]`` when present,
  whatever its type: a list where the schema says Tensor fails in the re-issue, after
  ``graph_task_update_begin`` and before ``graph_task_update_end`` (graphs.py L294-322).

The update skeleton (L270-323): one-element broadcast, then a real record-count check (L281, RuntimeError),
then per record ``update_begin``, the kwargs already present overwritten, ``handler.update_args``, the
re-issue, ``update_end``, ``event.record``. Records wrap kwargs with ``record_wrap_kwarg``
(npugraph_handler.py L117-171): lists element-wise, npu tensors as weak aliases, the rest deep-copied.
26.1 and master drive ``update_args`` from ``UPDATE_SPECS`` lists and add a ``should_handle`` bypass (for
FA3 only); for the ops simulated here they behave as 26.0.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

from support.npu_simulator import capture, state
from support.npu_simulator.auto_dispatch import (
    FIA,
    FIA_V2,
    INFER_OUTPUT_KEYS,
    PA,
    GraphDispatchMode,
    GraphDispatchRecord,
    is_npu_tensor,
    tensor_argument_names,
    torch_npu,
)
from support.npu_simulator.streams import ExternalEvent, stream
from support.npu_simulator.weak_refs import resolved, weak_ref_tensor


class NpuGraphOpHandler:
    """``NpuGraphOpHandler`` (npugraph_handler.py): the defaults every handler inherits."""

    @classmethod
    def prepare_capture(cls, func, args, kwargs):  # type: ignore[no-untyped-def]
        return func, args, kwargs

    @classmethod
    def postprocess_result(cls, result, kwargs):  # type: ignore[no-untyped-def]
        return result

    @classmethod
    def update_args(cls, record, update_input):  # type: ignore[no-untyped-def]
        pass

    @classmethod
    def record_wrap_kwarg(cls, func, key, value, tensor_param_names):  # type: ignore[no-untyped-def]
        if value is None:
            return None
        if isinstance(value, (list, tuple)):
            return type(value)(
                weak_ref_tensor(t) if is_npu_tensor(func, key, t) else deepcopy(t) for t in value
            )
        if key in tensor_param_names and is_npu_tensor(func, key, value):
            return weak_ref_tensor(value)
        return deepcopy(value)


class _FusedAttentionHandler(NpuGraphOpHandler):
    op = FIA
    lengths = (6, "actual_seq_lengths_kv")

    @classmethod
    def postprocess_result(cls, result, kwargs):  # type: ignore[no-untyped-def]
        return kwargs["out"]

    @classmethod
    def update_args(cls, record, update_input):  # type: ignore[no-untyped-def]
        index, key = cls.lengths
        if key in update_input and len(record.args) >= index + 1:
            record.args[index] = update_input[key]

    @classmethod
    def prepare_capture(cls, func, args, kwargs):  # type: ignore[no-untyped-def]
        module = torch_npu()
        func_out = getattr(module, cls.op).out
        if func is func_out:
            return func, args, kwargs
        workspace = getattr(module, f"_{cls.op}_get_max_workspace")(*args, **kwargs)
        keys = INFER_OUTPUT_KEYS[cls.op]
        output, lse = getattr(module, f"_{cls.op}_infer_output")(args[0], args[2], **{k: kwargs[k] for k in keys if k in kwargs})
        kwargs["workspace"] = workspace
        kwargs["out"] = [output, lse]
        return func_out, args, kwargs


class _FusedAttentionV2Handler(_FusedAttentionHandler):
    op = FIA_V2
    lengths = (8, "actual_seq_kvlen")


class _SimpleGraphHandler(NpuGraphOpHandler):
    _OP_ARG_SPECS = {f"{PA}.default": (7, "context_lens"), "npu_multi_head_latent_attention.out": (5, "context_lens")}

    @classmethod
    def update_args(cls, record, update_input):  # type: ignore[no-untyped-def]
        spec = cls._OP_ARG_SPECS.get(record.op_cache_entry.__name__)
        if spec:
            index, key = spec
            if key in update_input and len(record.args) >= index + 1:
                record.args[index] = update_input[key]


NPU_GRAPH_OP_HANDLERS: dict[str, type[NpuGraphOpHandler]] = {
    **{name: _FusedAttentionHandler for name in (FIA, f"{FIA}.default", f"{FIA}.out")},
    **{name: _FusedAttentionV2Handler for name in (FIA_V2, f"{FIA_V2}.default", f"{FIA_V2}.out")},
    **{name: _SimpleGraphHandler for name in (f"{PA}.default", "npu_multi_head_latent_attention.out")},
}


class RegistryGraphDispatchMode(GraphDispatchMode):
    """26.0's ``_GraphDispatchMode``: the registry skeleton."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        handler = NPU_GRAPH_OP_HANDLERS.get(func.__name__)
        if handler is None:
            return func(*args, **(kwargs or {}))
        kwargs = dict(kwargs or {})
        current = state.current().current_stream()
        event = ExternalEvent()
        event.wait(current)
        event.reset(current)
        func, args, kwargs = handler.prepare_capture(func, args, kwargs)
        capture.graph_task_group_begin(current)
        result = func(*args, **kwargs)
        handle = capture.graph_task_group_end(current)
        self.graph_dispatch_records.append(self._wrap(event, handle, args, kwargs, func, handler))
        return handler.postprocess_result(result, kwargs)

    def _wrap(self, event, handle, args, kwargs, func, handler) -> GraphDispatchRecord:  # type: ignore[no-untyped-def]
        names = [argument.name for argument in func._schema.arguments]
        args_ref = [
            weak_ref_tensor(element) if is_npu_tensor(func, names[index], element) else deepcopy(element)
            for index, element in enumerate(args)
        ]
        tensor_names = tensor_argument_names(func, from_7_3=True)
        kwargs_ref = {key: handler.record_wrap_kwarg(func, key, value, tensor_names) for key, value in kwargs.items()}
        return GraphDispatchRecord(event, handle, kwargs_ref, args_ref, func)

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
                for key in update_input:
                    if key in record.kwargs:
                        record.kwargs[key] = update_input[key]
                handler = NPU_GRAPH_OP_HANDLERS.get(record.op_cache_entry.__name__)
                if handler is None:
                    raise RuntimeError(f"No handler for recorded op: {record.op_cache_entry.__name__}.")
                handler.update_args(record, update_input)
                where = f"torch_npu 26.0's NPUGraph.update of {record.op_cache_entry}"
                record.op_cache_entry(*resolved(record.args, where), **resolved(record.kwargs, where))
                capture.graph_task_update_end(update_stream)
                record.event.record(update_stream)
