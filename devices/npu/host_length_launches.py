"""Launches of ops that take per-request lengths as host values, found while an NPU graph is captured.

Ascend attention kernels take the lengths as a host list (or a CPU tensor), and a captured graph bakes them
in. Each such launch must be updatable before every replay, and there are two ways, both set up here while
the capture runs (``HostLengthCapture`` watches every op issued inside the capture):

- auto: torch_npu (2.6+, ``auto_dispatch_capture=True``) has a handler for the op. Its own dispatch mode,
  below this one, brackets the launch in a task group gated by an ExternalEvent, and ``NPUGraph.update``
  re-issues it. This mode only notes that the graph holds such a launch, and for how many requests.
- explicit: torch_npu has no handler for the op. This mode does what the handler would: before the op, an
  ExternalEvent wait then reset on the capture stream (the replayed task waits until an update records the
  event); around it ``graph_task_group_begin``/``graph_task_group_end``, whose handle names the task for
  ``graph_task_update_begin`` later. The update re-issues the op with the new lengths (``ExplicitLaunch``).

Only ops called where a dispatch mode sees them are found: an op launched inside another custom op's kernel
is hidden from every dispatch mode (torch_npu's included) and its lengths stay baked in. Kernels must call
these ops directly (see ``refmodel.npu_decode_attention``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from devices.npu.runtime import TorchNpu
from hal import GraphHalError


@dataclass(frozen=True)
class HostLengthOp:
    """An op that takes per-request lengths as a host value.

    name:         the op's name without namespace or overload, as torch_npu registers it.
    argument:     the schema argument that carries the lengths.
    host_tensor:  the op takes them as a CPU int32 tensor (True) or a list of ints (False).
    torch_npu_handler: torch_npu 2.14 ships a capture handler for it (``_npugraph_handlers``); checked against
                  the installed torch_npu's own registry where that can be read.
    """

    name: str
    argument: str
    host_tensor: bool
    torch_npu_handler: bool

    def host_value(self, lengths: Sequence[int]) -> Any:
        return torch.tensor(list(lengths), dtype=torch.int32) if self.host_tensor else list(lengths)


HOST_LENGTH_OPS = {
    op.name: op
    for op in (
        HostLengthOp("npu_fused_infer_attention_score", "actual_seq_lengths_kv", False, torch_npu_handler=True),
        HostLengthOp("npu_fused_infer_attention_score_v2", "actual_seq_kvlen", False, torch_npu_handler=True),
        HostLengthOp("_npu_paged_attention", "context_lens", True, torch_npu_handler=False),
    )
}


class HostLengthUpdateError(GraphHalError, ValueError):
    """An update's lengths do not fit the graph, or a host-length op cannot be updated."""


@dataclass
class AutoLaunch:
    """A launch torch_npu records and updates itself (``NPUGraph.update``)."""

    op: HostLengthOp
    batch: int  # requests the launch was captured for: every update must give that many lengths


@dataclass
class ExplicitLaunch:
    """A launch without a torch_npu handler, bracketed by this plugin; re-issued with new lengths to update it."""

    op: HostLengthOp
    batch: int
    func: torch._ops.OpOverload
    args: tuple[Any, ...]  # held strongly: the tensors are the ones the captured task reads and writes
    kwargs: dict[str, Any]
    handle: Any  # from graph_task_group_end
    event: Any  # the ExternalEvent the captured task waits on

    def reissue(self, lengths: Sequence[int]) -> None:
        """Issue the op again with ``lengths``: between graph_task_update_begin/end this updates the task."""
        args, kwargs = with_argument(self.func, self.args, self.kwargs, self.op.argument, self.op.host_value(lengths))
        self.func(*args, **kwargs)


Launch = AutoLaunch | ExplicitLaunch


class HostLengthCapture(TorchDispatchMode):
    """Active inside an NPU graph capture, above torch_npu's own dispatch mode: records ``launches``."""

    def __init__(self, runtime: TorchNpu, launches: list[Launch]) -> None:
        super().__init__()
        self._runtime = runtime
        self._launches = launches
        self._handled_by_torch_npu = _torch_npu_handler_names(runtime)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        op = HOST_LENGTH_OPS.get(func._schema.name.split("::")[-1])
        if op is None:
            return func(*args, **kwargs)
        batch = len(argument_value(func, args, kwargs, op.argument))
        if self._torch_npu_handles(func, op):
            self._launches.append(AutoLaunch(op, batch))
            return func(*args, **kwargs)  # torch_npu's dispatch mode, below, brackets and records it
        return self._bracket(func, op, batch, args, kwargs)

    def _torch_npu_handles(self, func: torch._ops.OpOverload, op: HostLengthOp) -> bool:
        if self._handled_by_torch_npu is None:
            return op.torch_npu_handler
        packet = func.__name__.split(".")[0]
        return func.__name__ in self._handled_by_torch_npu or packet in self._handled_by_torch_npu

    def _bracket(self, func, op: HostLengthOp, batch: int, args, kwargs):  # type: ignore[no-untyped-def]
        if not func._schema.is_mutable:
            raise HostLengthUpdateError(
                f"{func} takes host lengths ({op.argument}) but returns fresh tensors: updating it re-issues the "
                "op, which must then write into the same outputs; call its out= variant inside the capture"
            )
        npu = self._runtime.npu
        stream = npu.current_stream()
        event = npu.ExternalEvent()
        event.wait(stream)  # the captured task waits until an update records the event...
        event.reset(stream)  # ...and re-arms it, so the next replay waits for the next update
        npu.graph_task_group_begin(stream)
        result = func(*args, **kwargs)
        handle = npu.graph_task_group_end(stream)
        self._launches.append(ExplicitLaunch(op, batch, func, tuple(args), dict(kwargs), handle, event))
        return result


def _torch_npu_handler_names(runtime: TorchNpu) -> frozenset[str] | None:
    """Op names torch_npu's auto-dispatch capture handles (torch_npu 2.14 keeps them in a registry), or None
    where that registry cannot be read (then ``HostLengthOp.torch_npu_handler`` decides)."""
    try:
        registry = importlib.import_module(f"{runtime.module.__name__}.npu._npugraph_handlers.npugraph_handler")
        return frozenset(registry._NPU_GRAPH_OP_HANDLERS)
    except Exception:  # older torch_npu: no such module; the static table stands
        return None


def _position(func: torch._ops.OpOverload, name: str) -> int:
    for position, argument in enumerate(func._schema.arguments):
        if argument.name == name:
            return position
    raise HostLengthUpdateError(f"{func} has no argument {name!r}; its schema: {func._schema}")


def argument_value(func: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any], name: str) -> Any:
    """An argument of an op call as a dispatch mode sees it (positional schema arguments arrive in ``args``)."""
    if name in kwargs:
        return kwargs[name]
    position = _position(func, name)
    if position < len(args):
        return args[position]
    raise HostLengthUpdateError(f"{func} was called without {name!r}: its lengths are unknown, so it cannot be updated")


def with_argument(
    func: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any], name: str, value: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``args``/``kwargs`` with argument ``name`` replaced by ``value``."""
    if name in kwargs:
        return tuple(args), {**kwargs, name: value}
    position = _position(func, name)
    return (*args[:position], value, *args[position + 1 :]), dict(kwargs)
