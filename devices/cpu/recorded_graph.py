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
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves, tree_map_only
from torch.utils._python_dispatch import TorchDispatchMode

from hal import GraphHalError, GraphStateError

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
# Tagged ``dynamic_output_shape`` for boolean-mask indexing only: with integer index tensors their output
# shape follows from the index shapes, and a CUDA graph captures them (transformers builds its attention
# masks by advanced integer indexing). A boolean or uint8 index still reads the mask on the host.
_MASK_ONLY_DYNAMIC = frozenset({torch.ops.aten.index.Tensor})


class HostSyncDuringCaptureError(GraphHalError, RuntimeError):
    """The forward read a device value back to the host while a graph was being captured."""


class RecordingPool:
    """The CPU's graph memory pool: a small caching allocator that behaves like a CUDA graph pool.

    Every tensor an op creates during a capture is placed in the pool's memory, and the recorded graph keeps
    only non-owning aliases of it, as a CUDA graph keeps only addresses. When the program drops its last
    reference to such a tensor, its block is free, and the next allocation in the pool (later in the same
    capture, or in the next capture into the pool) may reuse it. So on the cpu, as on a GPU:

    - the buckets of a runner share memory: an output of bucket 8 held across a run of bucket 4 is
      overwritten by it (runners say: outputs are valid until the next run);
    - a tensor that crosses a break or feeds a later piece must be held strongly by whoever needs it, or a
      later capture reuses its memory (sglang issue 37606);
    - ``bytes`` is the memory the pool's segments take, the figure a capture report gives.
    """

    def __init__(self) -> None:
        self._segments: list[torch.Tensor] = []  # owned memory, never returned to the system
        self._free: list[list[int]] = []  # [address, size] of free blocks, in address order
        self._live: dict[int, tuple[int, StorageWeakRef]] = {}  # block address -> (size, its storage's weakref)
        self._segment_starts: set[int] = set()  # a free block starting here never merges with the one before

    @property
    def bytes(self) -> int:
        return sum(segment.numel() for segment in self._segments)

    def owns(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor``'s memory is a block of this pool (live or not)."""
        return tensor.layout == torch.strided and tensor.untyped_storage().data_ptr() in self._live

    def allocate_like(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor in the pool with ``tensor``'s dtype, sizes and strides (contents uninitialised)."""
        nbytes = _storage_bytes(tensor)
        size = max(_round_up(nbytes, _BLOCK_ALIGNMENT), _BLOCK_ALIGNMENT)
        address = self._take(size)
        storage = torch._C._construct_storage_from_data_pointer(address, tensor.device, nbytes)
        self._live[address] = (size, StorageWeakRef(storage))
        block = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        return block.set_(storage, 0, tensor.size(), tensor.stride())

    def _take(self, size: int) -> int:
        self._collect()
        for index, (address, free_size) in enumerate(self._free):
            if free_size >= size:  # first fit in address order, as caching allocators mostly do
                if free_size == size:
                    del self._free[index]
                else:
                    self._free[index] = [address + size, free_size - size]
                return address
        segment = torch.empty(size, dtype=torch.uint8)
        self._segments.append(segment)
        self._segment_starts.add(segment.data_ptr())
        return segment.data_ptr()

    def _collect(self) -> None:
        """Give back the blocks whose tensors are all gone."""
        dead = [address for address, (_, ref) in self._live.items() if ref.expired()]
        for address in dead:
            size, _ = self._live.pop(address)
            self._release(address, size)

    def _release(self, address: int, size: int) -> None:
        self._free.append([address, size])
        self._free.sort()
        merged: list[list[int]] = []
        for block in self._free:
            if merged and merged[-1][0] + merged[-1][1] == block[0] and block[0] not in self._segment_starts:
                merged[-1][1] += block[1]
            else:
                merged.append(block)
        self._free = merged


# Blocks start at multiples of this, so a tensor of any dtype is aligned in its block.
_BLOCK_ALIGNMENT = 512


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _storage_bytes(tensor: torch.Tensor) -> int:
    """Bytes a storage needs to hold ``tensor`` laid out with its own strides from offset 0."""
    if tensor.numel() == 0:
        return 0
    span = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return span * tensor.element_size()


def _alias(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor over ``tensor``'s memory that does not keep it allocated (what a device graph holds)."""
    storage = tensor.untyped_storage()
    alias_storage = torch._C._construct_storage_from_data_pointer(storage.data_ptr(), tensor.device, storage.nbytes())
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return alias.set_(alias_storage, tensor.storage_offset(), tensor.size(), tensor.stride())


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
        if self.func.namespace == "c10d":
            # A collective (torch.distributed's c10d ops) returns its Work; the program waited on it at capture,
            # and on a device its kernels would be ordered before the next op's: wait for it here.
            for leaf in tree_leaves(result):
                if isinstance(leaf, torch.ScriptObject):  # the op returns its Work boxed
                    torch._C._distributed_c10d.Work.unbox(leaf).wait()
        if self.outputs:
            fresh = [leaf for leaf in tree_leaves(result) if isinstance(leaf, torch.Tensor)]
            for target, value in zip(self.outputs, fresh):
                target.copy_(value)


class _OpRecorder(TorchDispatchMode):
    """Runs each op as usual, places what it creates in the pool, and keeps what replay needs to issue it
    again: the op, and non-owning aliases of every pool tensor it reads or writes."""

    def __init__(self, ops: list[_RecordedOp], pool: RecordingPool) -> None:
        super().__init__()
        self._ops = ops
        self._pool = pool

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        _refuse_host_read(func, args, kwargs)
        result = _run_watching_for_host_reads(func, args, kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if _is_dense(t)}
        if torch.Tag.inplace_view in func.tags or (func.is_view and _aliases(result, inputs)):
            # A view aliases memory the other ops refresh; an in-place view (unsqueeze_, t_) changes only
            # metadata, which a device graph never replays. An op whose schema only allows aliasing (aten.to,
            # contiguous, reshape) and made new memory is computed like any other (a device graph runs its
            # copy kernel): skipping it would bake the capture-time value in.
            return result
        # What the op created goes into the pool, so its memory is reused once the program drops it.
        result = tree_map_only(torch.Tensor, lambda t: self._into_pool(t, inputs, copy=func not in _UNINITIALISED_FACTORIES), result)
        if func in _UNINITIALISED_FACTORIES:
            return result  # uninitialised memory: nothing to recompute at replay
        recorded_args, recorded_kwargs = tree_map_only(torch.Tensor, self._held, (args, kwargs))
        if func._schema.is_mutable:
            self._ops.append(_RecordedOp(func, recorded_args, recorded_kwargs))
        else:
            outputs = [self._held(leaf) for leaf in tree_leaves(result) if isinstance(leaf, torch.Tensor)]
            self._ops.append(_RecordedOp(func, recorded_args, recorded_kwargs, outputs))
        return result

    def _into_pool(self, tensor: torch.Tensor, input_storages: set[int], *, copy: bool) -> torch.Tensor:
        if not _is_dense(tensor) or tensor.untyped_storage().data_ptr() in input_storages:
            return tensor  # not fresh memory (an op handing back an input), or not a plain strided tensor
        placed = self._pool.allocate_like(tensor)
        if copy:
            with torch.utils._python_dispatch._disable_current_modes():
                placed.copy_(tensor)
        return placed

    def _held(self, tensor: torch.Tensor) -> torch.Tensor:
        """What the recorded op keeps of a tensor: an alias for pool memory (the program owns it, as it owns
        a CUDA graph's tensors), the tensor itself for anything else (inputs, weights, caches)."""
        return _alias(tensor) if _is_dense(tensor) and self._pool.owns(tensor) else tensor


class _HostReadDetector(TorchDispatchMode):
    """Refuses host reads inside custom ops: a custom op reaches a dispatch mode as one opaque call, and its
    kernel's own ops (``.item()`` in a Python kernel) would run unseen. A CUDA capture fails on them wherever
    they hide, so the reference device must too."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        _refuse_host_read(func, args, kwargs)
        return _run_watching_for_host_reads(func, args, kwargs)


# Namespaces of torch's own ops: their decompositions already reach the modes op by op.
_TORCH_NAMESPACES = frozenset({"aten", "prim", "prims"})


def _run_watching_for_host_reads(func: torch._ops.OpOverload, args: Any, kwargs: dict[str, Any]) -> Any:
    """Run ``func``; for a custom op, run its kernel with ``_HostReadDetector`` watching the ops inside."""
    if func.namespace in _TORCH_NAMESPACES:
        return func(*args, **kwargs)
    # Redispatch below the Python key (where modes live) on the arguments' own keys: the op's kernel runs,
    # and every op it calls comes back through the detector.
    keys = torch._C._dispatch_keyset_full_after(torch._C.DispatchKey.Python)
    tensor = next((t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)), None)
    if tensor is None:
        return func(*args, **kwargs)
    with _HostReadDetector():
        return func.redispatch(keys & torch._C._dispatch_keys(tensor), *args, **kwargs)


def _refuse_host_read(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if _reads_host(func, args, kwargs):
        raise HostSyncDuringCaptureError(
            f"{func} reads a device value back to the host (item(), tolist(), a data-dependent shape), "
            "which is not permitted while a device graph is being captured: the value would be baked in. "
            "Keep the value on the device, or move the op out of the captured region."
        )


def _reads_host(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    if not any(tag in func.tags for tag in _HOST_SYNC_TAGS):
        return False
    if func in _MASK_ONLY_DYNAMIC:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)
    return True


def _aliases(result: Any, input_storages: set[int]) -> bool:
    """Whether every tensor ``result`` holds shares memory with an input."""
    return all(t.untyped_storage().data_ptr() in input_storages for t in tree_leaves(result) if _is_dense(t))


def _is_dense(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.layout == torch.strided


class RecordedGraph:
    """A recorded op list that replays like a device graph. Empty until captured."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device  # named in its errors
        self._ops: list[_RecordedOp] = []
        self._pool: RecordingPool | None = None  # the memory the recorded aliases point into: kept alive
        self._capturing = False
        self._captured = False

    @property
    def captured(self) -> bool:
        return self._captured

    def record(self, pool: RecordingPool | None = None) -> "_RecordingSession":
        """A capture session into ``pool`` (None: a private pool for this graph)."""
        if self._capturing or self._captured:
            raise GraphStateError(
                f"this {self.device} graph is already captured (or capturing): make a new graph per capture "
                "(Device.make_graph)"
            )
        self._pool = pool if pool is not None else RecordingPool()
        return _RecordingSession(self, self._pool)

    def replay(self) -> None:
        if not self._captured:
            raise GraphStateError(
                f"replay of a {self.device} graph that was never captured (or whose capture failed): capture it first "
                "(Device.capture_session), or make a new graph and capture that"
            )
        for op in self._ops:
            op.replay()

    def reset(self) -> None:
        """Drop what was recorded; the graph can be captured again."""
        self._ops = []
        self._pool = None
        self._capturing = False
        self._captured = False


class _RecordingSession:
    """Context manager for one capture: records on entry, seals the graph on a clean exit."""

    def __init__(self, graph: RecordedGraph, pool: RecordingPool) -> None:
        self._graph = graph
        self._recorder = _OpRecorder(graph._ops, pool)

    def __enter__(self) -> RecordedGraph:
        self._graph._capturing = True
        self._recorder.__enter__()
        return self._graph

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        self._recorder.__exit__(None, None, None)
        if exc_type is not None:
            self._graph.reset()  # nothing half-captured survives a failed capture
            return None
        self._graph._capturing = False
        self._graph._captured = True
        return None
