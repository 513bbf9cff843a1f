"""The paged KV cache: per-layer key and value storage, and the graph-safe op a decode step writes with."""

from __future__ import annotations

import torch

from graphhal.paged_attention.block_allocator import NULL_BLOCK, BlockAllocator
from graphhal.paged_attention.cache_layout import CacheLayout
from graphhal.paged_attention.direct_kernels import unobserved_eager_call

# The slot padded rows write their K/V into: the first slot of the null block, which no request owns. Block 0
# starts at slot 0 whatever the block size, so this is a constant.
NULL_SLOT = 0
assert NULL_BLOCK == 0, "NULL_SLOT assumes the null block is block 0"


@torch.library.custom_op("graphhal::write_kv_cache", mutates_args=("key_cache", "value_cache"))
def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store row ``i``'s key/value [num_kv_heads, head_dim] at cache slot ``slot_mapping[i]``.

    A slot is ``block * block_size + offset``. The slot mapping is a device tensor and the write is one
    ``index_copy_``, so a captured graph rewrites it per replay with no host value baked in. Padded rows all
    point at ``NULL_SLOT``; several rows writing the same slot leave an unspecified one of them there, which
    is harmless because nobody reads the null block's contents as real context. The slot mapping may be int32
    (what the npu device's conventions ask for) or int64.

    A custom op rather than inline ``index_copy_`` so torch.compile sees one opaque in-place write of the
    cache, instead of functionalizing it into an out-of-place copy of the whole cache.
    """
    _write_kv_cache_kernel(key, value, key_cache, value_cache, slot_mapping)


@write_kv_cache.register_fake
def _(key, value, key_cache, value_cache, slot_mapping) -> None:
    return None


def _write_kv_cache_kernel(
    key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    # The op's body, for every device: one place for the op and for the model's direct eager calls.
    num_kv_heads, head_dim = key_cache.shape[-2:]
    slots = slot_mapping.long()  # index_copy_ takes int64 indices only; a no-op when they already are
    key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, key)
    value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, value)


def write_kv_cache_step(
    key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """What the model calls: ``graphhal::write_kv_cache``, whose kernel runs directly when nothing watches the
    call (``graphhal.paged_attention.direct_kernels``: the op's Python layers cost 3-4x the write itself)."""
    if unobserved_eager_call(key):
        _write_kv_cache_kernel(key, value, key_cache, value_cache, slot_mapping)
    else:
        _write_kv_cache_op(key, value, key_cache, value_cache, slot_mapping)


# Called as the OpOverload rather than through the CustomOpDef object: one Python layer fewer, same op.
_write_kv_cache_op = torch.ops.graphhal.write_kv_cache.default


class PagedKVCache:
    """Key and value caches for every layer, each [num_blocks, block_size, num_kv_heads, head_dim].

    ``allocator`` decides which blocks each request owns; block ``NULL_BLOCK`` is never handed out. The
    tensors are allocated once and zeroed, and keep their addresses for the cache's lifetime, which is what
    lets a captured graph read and write them on every replay.
    """

    def __init__(self, config: CacheLayout, num_blocks: int, device: torch.device | str, dtype: torch.dtype) -> None:
        self.config = config
        self.num_blocks = num_blocks
        self.block_size = config.block_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.allocator = BlockAllocator(num_blocks)
        shape = (num_blocks, config.block_size, config.num_kv_heads, config.head_dim)
        self.key_caches = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in range(config.num_layers)]
        self.value_caches = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in range(config.num_layers)]
        self.device = self.key_caches[0].device  # "cuda" resolved to "cuda:0", so device checks compare equal

    def slot(self, block: int, offset: int) -> int:
        """The flat slot index of token ``offset`` inside ``block``."""
        return block * self.block_size + offset
