"""The npu kernel of ``graphhal::prefill_attention``: torch_npu's fused infer-attention op in the packed "TND" layout.

This is vllm-ascend's chunked prefill (attention_v1.py, ``full_graph_fia`` and ``_get_fia_params``, main
182b75ea): the packed query ``[T, num_heads, head_dim]``, the paged cache as ``[num_blocks, block_size,
num_kv_heads * head_dim]`` with ``block_table`` and ``block_size``, ``actual_seq_lengths`` the CUMULATIVE query
ends of the requests (TND's convention), ``actual_seq_lengths_kv`` each request's cached context plus new
tokens, and ``sparse_mode=3`` (rightDownCausal: each request causal from its cached context on) with the
2048 x 2048 mask torch_npu requires for it (1 above the diagonal; vllm-ascend's ``get_splitfuse_attn_mask``).
op-plugin documents TND over a paged cache from torch_npu 7.3 only, with a head dim of 128 or 192 and blocks
of 16n tokens up to 1024 (``npu_fused_attention_limits``); elsewhere this kernel runs the graph-safe torch
kernel (``prefill_attention_masked``) and says why, once.

Lengths are host values the launch bakes in, as in decode (``graphhal.paged_attention.npu_decode_attention``):
read on the host once per step outside a capture (``hal.host_list``); while an NPU graph is capturing,
placeholders that the npu device replaces before every replay (``Device.update`` with ``seq_lens`` and
``query_lens``): the T tokens split as evenly as possible over the R requests (a valid split that a later
update redistributes), each request's KV length its query length (no cached context: valid for the causal
mode, and within the blocks the cache holds). The workspace the npu device allocates covers any length the
block tables allow (the op's "max workspace").

Padding, which the runner adds and the op has no notion of:
- A padding request (``query_len`` 0) stays in the batch with no query tokens: its cumulative end repeats the
  previous one, which torch_npu documents as valid ("a later value >= an earlier one").
- Padded tokens (rows at or past ``sum(query_lens)``): in TND, T is the sum of the query lengths, so the last
  cumulative end must be T. The call therefore carries one request past the R request rows, the token tail,
  which owns those rows: its block-table row is the null block and its KV length 1, as vllm-ascend's dummy
  padding request (``_pad_query_start_loc_for_fia``); the npu device's updates keep it and end it at T
  (``devices.npu.launch_lengths``). Whatever the op writes in the tail's rows, they are zeroed here on the
  device (the live token count is read from ``query_lens`` in device memory, so a graph replays it right).

Like decode, the op must be called where the npu device's capture sees it: ``calls_npu_directly`` routes npu
tensors to this kernel before the custom op is entered (outside torch.compile); ``npu_decode_attention.register_npu_kernel``
makes it the custom op's npu kernel for the calls that do go through the op. float16 and bfloat16 only.
"""

from __future__ import annotations

import functools
from itertools import accumulate
from typing import Any, Callable

import torch

import hal
from graphhal.paged_attention.block_allocator import NULL_BLOCK
from graphhal.paged_attention.npu_decode_attention import causal_mask, fused_attention_module, is_npu_tensor
from graphhal.paged_attention.npu_fused_attention_limits import prefill_route
from graphhal.paged_attention.prefill_attention_masked import prefill_attention_masked
from graphhal.paged_attention.prefill_attention_reference import prefill_layout

RIGHT_DOWN_CAUSAL = 3
TAIL_KV_LENGTH = 1  # the token tail's KV length: any valid positive length (vllm-ascend pads with 1)


def prefill_attention_npu(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> None:
    """``graphhal::prefill_attention`` through ``torch_npu.npu_fused_infer_attention_score`` (same arguments)."""
    torch_npu = fused_attention_module(q, "prefill")
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = key_cache.shape
    requests, max_blocks = block_tables.shape
    if prefill_route(torch_npu, head_dim, block_size, q.dtype).layout is None:
        out.copy_(prefill_attention_masked(q, key_cache, value_cache, block_tables, query_lens, seq_lens, scale))
        return
    if torch.npu.is_current_stream_capturing():  # replaced by the update before any replay
        query_ends = _even_split_ends(num_tokens, requests)
        kv_lengths = [end - start for start, end in zip([0, *query_ends], query_ends)]
    else:
        prefill_layout(num_tokens, block_size, block_tables, query_lens, seq_lens)  # a clear error for a misfit
        query_ends = list(accumulate(hal.host_list(query_lens)))
        kv_lengths = hal.host_list(seq_lens)
    tail_table = block_tables.new_full((1, max_blocks), NULL_BLOCK, dtype=torch.int32)
    tables_with_tail = torch.cat([block_tables.to(torch.int32), tail_table])  # the op takes int32 block tables
    attention, _ = torch_npu.npu_fused_infer_attention_score(
        q.contiguous(),
        key_cache.view(num_blocks, block_size, num_kv_heads * head_dim),
        value_cache.view(num_blocks, block_size, num_kv_heads * head_dim),
        atten_mask=causal_mask(q.device),
        actual_seq_lengths=[*query_ends, num_tokens],  # the token tail ends at T
        actual_seq_lengths_kv=[*kv_lengths, TAIL_KV_LENGTH],
        block_table=tables_with_tail,
        num_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        scale=scale,
        input_layout="TND",
        sparse_mode=RIGHT_DOWN_CAUSAL,
        block_size=block_size,
    )
    live = torch.arange(num_tokens, device=q.device) < query_lens.sum()  # padded tokens: rows past the live ones
    out.copy_(attention.masked_fill(~live[:, None, None], 0))


def _even_split_ends(tokens: int, requests: int) -> list[int]:
    """Cumulative ends of ``tokens`` split over ``requests`` as evenly as possible (vLLM's dummy batches split
    the same way), ending at ``tokens``."""
    share, extra = divmod(tokens, requests)
    return list(accumulate(share + (1 if index < extra else 0) for index in range(requests)))


def calls_npu_directly(op: Callable[..., Any]) -> Callable[..., Any]:
    """``op`` (the prefill attention custom op, or its eager step), except that npu tensors outside torch.compile
    run ``prefill_attention_npu`` directly, where an NPU graph capture sees the fused op (module docstring)."""

    @functools.wraps(op)
    def prefill_attention(q, key_cache, value_cache, block_tables, query_lens, seq_lens, scale, out):  # type: ignore[no-untyped-def]  # noqa: E501
        if not torch.compiler.is_compiling() and is_npu_tensor(q):
            return prefill_attention_npu(q, key_cache, value_cache, block_tables, query_lens, seq_lens, scale, out)
        return op(q, key_cache, value_cache, block_tables, query_lens, seq_lens, scale, out)

    return prefill_attention
