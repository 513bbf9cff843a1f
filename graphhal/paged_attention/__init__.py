"""Paged attention and its KV cache: the ops a paged decoder calls, shared by the reference model and the
transformers integration.

    cache = PagedKVCache(layout, num_blocks, device, dtype)        # layout: any CacheLayout (a ModelConfig)
    slots = decode_input_slots(layout)                             # what a DecodeRunner is built with
    decode_attention(query, cache.key_caches[i], ..., out=out)     # graphhal::decode_attention

The ops are torch custom ops (``graphhal::decode_attention``, ``graphhal::prefill_attention``,
``graphhal::write_kv_cache``) with one kernel per device (Triton on cuda, masked torch on cpu, torch_npu's
fused infer-attention on npu); each declares how far it can be captured (``hal.declare_graph_support``) and
is a splitting op for piecewise graphs. Importing this package needs neither triton nor CUDA.
"""

from graphhal.paged_attention.block_allocator import NULL_BLOCK, BlockAllocator, OutOfBlocksError
from graphhal.paged_attention.cache_layout import CacheLayout
from graphhal.paged_attention.decode_attention_op import decode_attention
from graphhal.paged_attention.decode_attention_reference import decode_attention_reference
from graphhal.paged_attention.decode_inputs import decode_input_slots
from graphhal.paged_attention.kv_cache import NULL_SLOT, PagedKVCache, write_kv_cache
from graphhal.paged_attention.prefill_attention_op import prefill_attention
from graphhal.paged_attention.prefill_attention_reference import prefill_attention_reference
from graphhal.paged_attention.prefill_inputs import (
    PREFILL_ROW_OUTPUTS,
    logits_rows_slot,
    prefill_request_slots,
    prefill_token_slots,
)

__all__ = [
    "NULL_BLOCK",
    "NULL_SLOT",
    "PREFILL_ROW_OUTPUTS",
    "BlockAllocator",
    "CacheLayout",
    "OutOfBlocksError",
    "PagedKVCache",
    "decode_attention",
    "decode_attention_reference",
    "decode_input_slots",
    "logits_rows_slot",
    "prefill_attention",
    "prefill_attention_reference",
    "prefill_request_slots",
    "prefill_token_slots",
    "write_kv_cache",
]
