"""Non-owning aliases of graph outputs, so that every bucket's outputs can share the pool's memory.

A captured graph writes its outputs into pool memory at fixed addresses. If the runner kept the output
tensors themselves, each bucket's outputs would stay allocated for good, and a server's 36 decode buckets
would hold 36 sets of logits side by side (on an H100: 88 MiB of pool for what one bucket 256 captures in 28).
An alias that does not own its memory reads the same addresses while letting the allocator treat the
memory as free once the capture is over: the next, smaller capture into the pool reuses it, and all buckets'
outputs overlap. That is the contract runners already state: outputs are valid until the next replay of any
graph in the pool (vLLM keeps only weak references to its last graph's outputs for the same reason).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree


def non_owning_alias(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor over ``tensor``'s memory (same offset, shape and strides) that does not keep it allocated."""
    storage = tensor.untyped_storage()
    alias_storage = torch._C._construct_storage_from_data_pointer(storage.data_ptr(), tensor.device, storage.nbytes())
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return alias.set_(alias_storage, tensor.storage_offset(), tensor.size(), tensor.stride())


def non_owning_outputs(outputs: Any) -> Any:
    """``outputs`` (a tensor or nested containers of tensors) with every tensor replaced by its alias."""
    return pytree.tree_map_only(torch.Tensor, non_owning_alias, outputs)
