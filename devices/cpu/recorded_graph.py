"""A device graph for the CPU that behaves like a captured CUDA graph.

Capture records every aten op the forward issues (through a ``TorchDispatchMode``) together with its
arguments; replay re-issues exactly those ops on exactly those tensors and writes each result back into the
tensor the op produced at capture. That gives the CPU the properties that make device graphs hard, so the
cpu tests catch the same bugs a GPU would:

- host-side values are baked in: a Python int taken from the batch at capture (a length, a bucket size)
  keeps its capture-time value on every replay;
- tensors are bound by identity: a replay reads the captured input tensors, never new ones, and refills the
  captured output tensors, which the next replay overwrites;
- reading a device value back to the host during capture (``.item()``, ``.tolist()``, ``nonzero``, data
  dependent shapes) is an error, as it is inside a CUDA capture.

It is slower than running the forward: it exists to be faithful, not fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

# Ops whose result is uninitialised memory: nothing to recompute at replay.
_UNINITIALISED_FACTORIES = frozenset(
    {
        torch.ops.aten.empty.memory_format,
        torch.ops.aten.empty_like.default,
        torch.ops.aten.empty_strided.default,
        torch.ops.aten.new_empty.default,
        torch.ops.aten.new_empty_strided.default,
    }
)
# Tags of ops that need a device value on the host: illegal inside a device-graph capture.
_HOST_SYNC_TAGS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)


class HostSyncDuringCaptureError(RuntimeError):
    """The forward read a device value back to the host while a graph was being captured."""


class RecordingPool:
    """The CPU's graph memory pool: the storages that graphs captured into it keep alive.

    It only counts bytes, for capture reports; every recorded graph holds its tensors itself.
    """

    def __init__(self) -> None:
        self._bytes_by_storage: dict[int, int] = {}

    def hold(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        self._bytes_by_storage[storage.data_ptr()] = storage.nbytes()

    @property
    def bytes(self) -> int:
        return sum(self._bytes_by_storage.values())


@dataclass
class _RecordedOp:
    func: torch._ops.OpOverload
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    # Tensors a functional op produced at capture; replay copies the recomputed result into them.
    # Empty for ops that mutate their arguments in place (they are simply re-run).
    outputs: list[torch.Tensor] = field(default_factory=list)

    def replay(self) -> None:
        result = self.func(*self.args, **self.kwargs)
        if self.outputs:
            fresh = [leaf for leaf in tree_leaves(result) if isinstance(leaf, torch.Tensor)]
            for target, value in zip(self.outputs, fresh):
                target.copy_(value)


class _OpRecorder(TorchDispatchMode):
    """Runs each op as usual and keeps what replay needs to issue it again."""

    def __init__(self, ops: list[_RecordedOp]) -> None:
        super().__init__()
        self._ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if any(tag in func.tags for tag in _HOST_SYNC_TAGS):
            raise HostSyncDuringCaptureError(
                f"{func} reads a device value back to the host (item(), tolist(), a data-dependent shape), "
                "which is not permitted while a device graph is being captured: the value would be baked in. "
                "Keep the value on the device, or move the op out of the captured region."
            )
        result = func(*args, **kwargs)
        if func.is_view or torch.Tag.inplace_view in func.tags or func in _UNINITIALISED_FACTORIES:
            # A view aliases memory the other ops refresh; an in-place view (unsqueeze_, t_) changes only
            # metadata, which a device graph never replays; uninitialised memory needs nothing.
            return result
        if func._schema.is_mutable:
            self._ops.append(_RecordedOp(func, args, kwargs))
        else:
            outputs = [leaf for leaf in tree_leaves(result) if isinstance(leaf, torch.Tensor)]
            self._ops.append(_RecordedOp(func, args, kwargs, outputs))
        return result


class RecordedGraph:
    """A recorded op list that replays like a device graph. Empty until captured."""

    def __init__(self) -> None:
        self._ops: list[_RecordedOp] = []
        self._capturing = False
        self._captured = False

    @property
    def captured(self) -> bool:
        return self._captured

    @property
    def num_ops(self) -> int:
        return len(self._ops)

    def record(self, pool: RecordingPool | None = None) -> "_RecordingSession":
        if self._capturing or self._captured:
            raise RuntimeError("this graph is already captured (or capturing); make a new graph per capture")
        return _RecordingSession(self, pool)

    def replay(self) -> None:
        if not self._captured:
            raise RuntimeError("replay of a graph that was never captured (or whose capture failed)")
        for op in self._ops:
            op.replay()

    def reset(self) -> None:
        """Drop what was recorded; the graph can be captured again."""
        self._ops = []
        self._capturing = False
        self._captured = False


class _RecordingSession:
    """Context manager for one capture: records on entry, seals the graph on a clean exit."""

    def __init__(self, graph: RecordedGraph, pool: RecordingPool | None) -> None:
        self._graph = graph
        self._pool = pool
        self._recorder: _OpRecorder | None = None

    def __enter__(self) -> RecordedGraph:
        self._graph._capturing = True
        self._recorder = _OpRecorder(self._graph._ops)
        self._recorder.__enter__()
        return self._graph

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        assert self._recorder is not None
        self._recorder.__exit__(None, None, None)
        if exc_type is not None:
            self._graph.reset()  # nothing half-captured survives a failed capture
            return None
        self._graph._capturing = False
        self._graph._captured = True
        if self._pool is not None:
            for op in self._graph._ops:
                for tensor in op.outputs:
                    self._pool.hold(tensor)
        return None

