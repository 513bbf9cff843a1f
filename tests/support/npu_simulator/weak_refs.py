"""What a SIMULATED captured task, and torch_npu's dispatch records, hold of a tensor: its memory, not the tensor.

On hardware a captured task holds device addresses. Nothing in the graph keeps a tensor alive: memory the
capture allocated stays reserved in the graph pool, and everything else (weights, caches, static inputs) must
be kept alive by whoever owns it. torch_npu's records do the same on purpose: ``_weak_ref_tensor(t)``
(torch_npu/csrc/npu/Module.cpp L621-632 at v7.3.0) is a ``from_blob`` alias over ``t``'s memory that does not
keep it alive. When such memory is freed, the allocator hands it to the next tensor, and a replay or an update
through the old address silently reads and writes someone else's data.

``MemoryRef`` is the simulator's address: a weak reference to the tensor's storage (memory, not the tensor
object: a view of a live tensor is live) plus the view's geometry. Memory the capturing graph allocated from
its pool is held (the pool keeps the block, for later captures into that pool only, which never run while the
graph replays or updates: how torch_npu's handlers get away with holding their workspace weakly). Resolving a
reference whose memory is gone raises ``DanglingRecordError``.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_map

from support.npu_simulator import state
from support.npu_simulator.errors import DanglingRecordError


class MemoryRef:
    """An address: the memory of a tensor (held only when it is graph-pool memory) and the view on it."""

    def __init__(self, tensor: torch.Tensor, pool_block: bool) -> None:
        storage = tensor.untyped_storage()
        self._storage = weakref.ref(storage)
        self._pool_block = storage if pool_block else None
        self.dtype, self.shape, self.stride = tensor.dtype, tuple(tensor.shape), tuple(tensor.stride())
        self.offset = tensor.storage_offset()
        self.pointer = tensor.data_ptr()

    def resolve(self, where: str) -> torch.Tensor:
        storage = self._pool_block if self._pool_block is not None else self._storage()
        if storage is None:
            raise DanglingRecordError(
                f"{where}: it holds only the address of a {self.shape} {self.dtype} tensor (a captured task, or "
                "torch_npu's weak alias _weak_ref_tensor) that was freed after the capture; on hardware it reads "
                "and writes memory now used by other tensors"
            )
        with _disable_current_modes(), torch.no_grad():  # an alias, as from_blob makes: no device work
            return torch.empty(0, dtype=self.dtype, device=storage.device).set_(storage, self.offset, self.shape, self.stride)

    def __repr__(self) -> str:
        return f"<simulated address of a {self.shape} {self.dtype} tensor>"


def in_capturing_pool(tensor: torch.Tensor) -> bool:
    """The tensor's memory was allocated by the graph this thread is capturing (graph-pool memory)."""
    graph = state.current().capturing_graph
    return graph is not None and graph.owns_memory(tensor)


def weak_ref_tensor(tensor: torch.Tensor) -> MemoryRef:
    """``torch_npu._C._weak_ref_tensor``."""
    return MemoryRef(tensor, pool_block=in_capturing_pool(tensor))


def resolved(value: Any, where: str) -> Any:
    """``value`` (args, kwargs, nested lists) with every address replaced by a tensor over its memory."""
    return tree_map(lambda leaf: leaf.resolve(where) if isinstance(leaf, MemoryRef) else leaf, value)
