"""A small Llama-style decoder with a paged KV cache: the model graphhal's runners are tested and benchmarked on.

It plays an inference server's part: ``LlamaDecoder(...).decode_forward(kv_cache)`` is the decode forward
callable, ``graphhal.paged_attention.decode_input_slots`` describes its inputs, and ``DecodeWorkload`` makes
batches of live requests; ``prefill_forward(kv_cache)``, ``prefill_token_slots`` / ``prefill_request_slots``
and ``PrefillWorkload`` are the same for the prefill step (packed tokens of several requests). Its attention
and KV cache are ``graphhal.paged_attention``'s. Importing this package needs neither triton nor CUDA.
"""

from graphhal.refmodel.config import ModelConfig
from graphhal.refmodel.decode_workload import DecodeWorkload
from graphhal.refmodel.model import DecodeStep, LlamaDecoder, PrefillRowsStep, PrefillStep
from graphhal.refmodel.prefill_workload import PrefillWorkload

__all__ = ["DecodeStep", "DecodeWorkload", "LlamaDecoder", "ModelConfig", "PrefillRowsStep", "PrefillStep", "PrefillWorkload"]
