"""A small Llama-style decoder with a paged KV cache: the model graphhal's runners are tested and benchmarked on.

It plays an inference server's part: ``LlamaDecoder(...).decode_forward(kv_cache)`` is the decode forward
callable, ``decode_input_slots`` describes its inputs, and ``DecodeWorkload`` makes batches of live requests;
``prefill_forward(kv_cache)``, ``prefill_token_slots`` / ``prefill_request_slots`` and ``PrefillWorkload``
are the same for the prefill step (packed tokens of several requests).
Importing this package needs neither triton nor CUDA; the Triton kernel is imported on the first CUDA call.
"""

from refmodel.decode_attention_op import decode_attention
from refmodel.decode_attention_reference import decode_attention_reference
from refmodel.block_allocator import NULL_BLOCK, BlockAllocator, OutOfBlocksError
from refmodel.config import ModelConfig
from refmodel.decode_inputs import decode_input_slots
from refmodel.kv_cache import NULL_SLOT, PagedKVCache, write_kv_cache
from refmodel.model import DecodeStep, LlamaDecoder, PrefillStep
from refmodel.prefill_attention_op import prefill_attention
from refmodel.prefill_attention_reference import prefill_attention_reference
from refmodel.prefill_inputs import prefill_request_slots, prefill_token_slots
from refmodel.prefill_workload import PrefillWorkload
from refmodel.decode_workload import DecodeWorkload

__all__ = [
    "NULL_BLOCK",
    "NULL_SLOT",
    "BlockAllocator",
    "DecodeStep",
    "DecodeWorkload",
    "LlamaDecoder",
    "ModelConfig",
    "OutOfBlocksError",
    "PagedKVCache",
    "PrefillStep",
    "PrefillWorkload",
    "decode_attention",
    "decode_attention_reference",
    "decode_input_slots",
    "prefill_attention",
    "prefill_attention_reference",
    "prefill_request_slots",
    "prefill_token_slots",
    "write_kv_cache",
]
