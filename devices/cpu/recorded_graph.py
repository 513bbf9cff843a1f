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
  dependent shapes) is an error, as it is inside a CUDA capture;
- what a capture creates lives in a graph pool that places blocks as CUDA's caching allocator does
  (``RecordingPool``): buckets share memory where a GPU's would, and a pool estimate reads what it reads there.

It is slower than running the forward: it exists to be faithful, not fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves, tree_map_only
from torch.utils._python_dispatch import TorchDispatchMode

from devices.cpu import baked_values, device_memory
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
    """The CPU's graph memory pool: a model of the CUDA caching allocator's graph pool, so that memory is
    shared and reused on the cpu exactly where a GPU shares and reuses it.

    Every tensor an op creates during a capture is placed in the pool's memory, and the recorded graph keeps
    only non-owning aliases of it, as a CUDA graph keeps only addresses. When the program drops its last
    reference to such a tensor, its block is free, and the next allocation in the pool (later in the same
    capture, or in the next capture into the pool) may reuse it. So on the cpu, as on a GPU:

    - the buckets of a runner share memory: an output of bucket 8 held across a run of bucket 4 is
      overwritten by it (runners say: outputs are valid until the next run);
    - a tensor that crosses a break or feeds a later piece must be held strongly by whoever needs it, or a
      later capture reuses its memory (sglang issue 37606);
    - ``bytes`` is the memory the pool's segments take, the figure a capture report gives: as on a GPU, at
      least one 2 MiB segment once anything is captured, however small.

    Placement follows ``c10/cuda/CUDACachingAllocator.cpp`` (default settings), because where a block lands
    decides which held output a later capture overwrites and how large the pool grows:

    - requests are rounded up to 512 bytes; those up to 1 MiB come from 2 MiB segments, larger ones from
      20 MiB segments (under 10 MiB) or a segment of their own rounded up to 2 MiB; small and large blocks
      never share a segment;
    - a request takes the smallest free block that fits (best fit), split when what is left is worth keeping
      (at least 512 bytes in a small segment, over 1 MiB in a large one); a freed block merges with free
      neighbours in its segment.

    Where CUDA breaks ties between equally sized free blocks by device address, this pool breaks them by
    segment and offset in the order the pool made them: host addresses come from malloc and differ between
    two pools of one process, and placement (and so ``bytes``) must not depend on them, or identical
    runners would estimate different pools.
    """

    def __init__(self) -> None:
        device_memory.track_pool(self)  # its segments count in the cpu device's model of device memory
        self._segments: list[torch.Tensor] = []  # owned memory, never returned to the system
        self._free: list[_Block] = []  # free blocks of every segment
        self._live: dict[int, tuple[_Block, StorageWeakRef]] = {}  # block address -> (block, its storage's weakref)

    @property
    def bytes(self) -> int:
        return sum(segment.numel() for segment in self._segments)

    def owns(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor``'s memory is a block of this pool (live or not)."""
        return tensor.layout == torch.strided and tensor.untyped_storage().data_ptr() in self._live

    def allocate_like(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor in the pool with ``tensor``'s dtype, sizes and strides (contents uninitialised)."""
        nbytes = _storage_bytes(tensor)
        if nbytes == 0:  # CUDA hands a zero-byte request no memory at all
            return torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype, device=tensor.device)
        block = self._take(_round_up(nbytes, _MIN_BLOCK))
        address = self._segments[block.segment].data_ptr() + block.offset
        storage = torch._C._construct_storage_from_data_pointer(address, tensor.device, nbytes)
        self._live[address] = (block, StorageWeakRef(storage))
        placed = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        return placed.set_(storage, 0, tensor.size(), tensor.stride())

    def _take(self, size: int) -> _Block:
        self._collect()
        small = size <= _SMALL_REQUEST
        fitting = [block for block in self._free if block.small == small and block.size >= size]
        if fitting:
            block = min(fitting, key=_Block.order)  # best fit, as the CUDA allocator's size-ordered free set
            self._free.remove(block)
        else:
            block = self._new_segment(size, small)
        remaining = block.size - size
        if (remaining >= _MIN_BLOCK) if small else (remaining > _SMALL_REQUEST):
            self._free.append(_Block(block.segment, block.offset + size, remaining, small))
            block = _Block(block.segment, block.offset, size, small)
        return block

    def _new_segment(self, size: int, small: bool) -> _Block:
        if small:
            segment_size = _SMALL_SEGMENT
        elif size < _MIN_LARGE_SEGMENT_REQUEST:
            segment_size = _LARGE_SEGMENT
        else:
            segment_size = _round_up(size, _LARGE_ROUNDING)
        self._segments.append(torch.empty(segment_size, dtype=torch.uint8))
        return _Block(len(self._segments) - 1, 0, segment_size, small)

    def _collect(self) -> None:
        """Give back the blocks whose tensors are all gone."""
        dead = [address for address, (_, ref) in self._live.items() if ref.expired()]
        for address in dead:
            block, _ = self._live.pop(address)
            self._release(block)

    def _release(self, block: _Block) -> None:
        """Free ``block``, merged with the free blocks right before and after it in its segment."""
        for neighbour in [b for b in self._free if b.segment == block.segment]:
            if neighbour.offset + neighbour.size == block.offset or block.offset + block.size == neighbour.offset:
                self._free.remove(neighbour)
                block = _Block(block.segment, min(block.offset, neighbour.offset), block.size + neighbour.size, block.small)
        self._free.append(block)


@dataclass(frozen=True)
class _Block:
    """A piece of one of the pool's segments."""

    segment: int  # index in the pool's segments: the order they were made in
    offset: int
    size: int
    small: bool  # in a segment for requests up to 1 MiB

    def order(self) -> tuple[int, int, int]:
        """Best fit: the smallest block first, then the earliest made (CUDA: the lowest address)."""
        return (self.size, self.segment, self.offset)


# The CUDA caching allocator's constants (c10/cuda/CUDACachingAllocator.cpp, default settings).
_MIN_BLOCK = 512  # kMinBlockSize: requests round up to it, so a tensor of any dtype is aligned in its block
_SMALL_REQUEST = 1 << 20  # kSmallSize: requests up to it come from small segments
_SMALL_SEGMENT = 2 << 20  # kSmallBuffer
_LARGE_SEGMENT = 20 << 20  # kLargeBuffer: for requests over 1 MiB and under 10 MiB
_MIN_LARGE_SEGMENT_REQUEST = 10 << 20  # kMinLargeAlloc: from it on, a segment of the request's own size
_LARGE_ROUNDING = 2 << 20  # kRoundLarge


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


class _ThreadLocalMode(TorchDispatchMode):
    """A dispatch mode of this thread's capture that leaves torch.compile in other threads alone.

    Dynamo does not trace while a (non-infra) dispatch mode is active. torch 2.11 and later ask the current
    thread's mode stack; torch 2.10 and earlier read a flag of the process instead, which every mode sets on
    entry and restores on exit, from whichever thread. A capture in one thread then stops torch.compile in
    every other (a piecewise runner compiling there runs its forward without its backend), and two threads
    entering and leaving modes in turn can leave the flag set for good, so that nothing in the process is
    compiled again. Where Dynamo reads that flag, these modes call themselves infra modes, which keeps them
    off it (the flag is all that torch 2.6 to 2.10 use the word for); elsewhere they stay what they are, so
    torch.compile skips frames entered inside a capture as it does for any mode."""

    @classmethod
    def is_infra_mode(cls) -> bool:
        # torch 2.11 added the option (on by default) to walk the thread's own stack instead of the flag.
        return not getattr(torch._dynamo.config, "inline_torch_dispatch_torch_compile", False)


class _OpRecorder(_ThreadLocalMode):
    """Runs each op as usual, places what it creates in the pool, and keeps what replay needs to issue it
    again: the op, and non-owning aliases of every pool tensor it reads or writes."""

    def __init__(self, ops: list[_RecordedOp], pool: RecordingPool, baked: list | None = None) -> None:
        super().__init__()
        self._ops = ops
        self._pool = pool
        self._baked = baked  # with GRAPHHAL_REPORT_BAKED_VALUES: where the Python numbers it records go

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
        if self._baked is not None:
            self._baked.extend(v for v in baked_values.baked_in(func, args, kwargs) if v not in self._baked)
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


class _HostReadDetector(_ThreadLocalMode):
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
        self.baked_values: list[baked_values.BakedValue] = []  # with GRAPHHAL_REPORT_BAKED_VALUES: what it baked in
        self._capturing = False
        self._captured = False

    @property
    def captured(self) -> bool:
        return self._captured

    @property
    def num_ops(self) -> int:
        """Ops recorded: the nodes of the executable graph the cpu device's memory model charges for."""
        return len(self._ops)

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
        graph.baked_values = []
        self._recorder = _OpRecorder(graph._ops, pool, graph.baked_values if baked_values.enabled() else None)

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
        device_memory.track_graph(self._graph)
        baked_values.report(self._graph.device, self._graph.baked_values)
        return None
