"""``refmodel::prefill_attention``: the prefill attention custom op the model calls, and its break point.

Like ``refmodel::decode_attention`` it writes into a caller-provided ``out`` (vLLM's "_with_output"
convention): a graph strategy that splits the compiled graph at this op runs it eagerly between captured
pieces, and the next piece reads ``out`` at the address it was captured with.

Unlike decode attention it is never captured: its kernels read the request lengths on the host to slice the
packed batch per request, so the op is a required break point. Kernels: CPU and CUDA run one
``scaled_dot_product_attention`` per request over only that request's tokens; any other device runs the
token-by-token reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

import hal
from refmodel.prefill_attention_reference import prefill_attention_reference, prefill_layout


@torch.library.custom_op("refmodel::prefill_attention", mutates_args=("out",))
def prefill_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> None:
    """Write paged prefill attention of the packed ``q`` [T, num_heads, head_dim] into ``out`` (same shape).

    See ``prefill_attention_reference`` for the packed layout, the argument shapes and the math (causal from
    each request's cached context on, GQA, zeros in padded tokens' rows).
    """
    _check_out(q, out)
    out.copy_(prefill_attention_reference(q, key_cache, value_cache, block_tables, query_lens, seq_lens, scale))


@prefill_attention.register_fake
def _(q, key_cache, value_cache, block_tables, query_lens, seq_lens, scale, out) -> None:
    return None


@prefill_attention.register_kernel(("cpu", "cuda"))
def _prefill_attention_by_request(q, key_cache, value_cache, block_tables, query_lens, seq_lens, scale, out) -> None:
    # One SDPA call per request, over only the tokens that request has: the host lengths are known here, so
    # nothing is padded to the longest request. Index tensors are built on q's device from host ints, so on
    # CUDA the only syncs are the two length reads in prefill_layout.
    _check_out(q, out)
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    flat_keys = key_cache.view(-1, num_kv_heads, head_dim)
    flat_values = value_cache.view(-1, num_kv_heads, head_dim)
    offsets_in_block = torch.arange(block_size, device=q.device)
    live_tokens = 0
    for request in prefill_layout(num_tokens, block_size, block_tables, query_lens, seq_lens):
        query_len, seq_len, first = request.query_len, request.seq_len, request.first_token
        blocks = block_tables[request.index, : -(-seq_len // block_size)].long()
        slots = (blocks[:, None] * block_size + offsets_in_block).reshape(-1)[:seq_len]
        # Each KV head repeated for its group of query heads ([num_heads, seq_len, head_dim]): the float32
        # copy is made anyway, and one head per query head keeps the causal mask structured (below).
        keys = flat_keys.index_select(0, slots).float().transpose(0, 1).repeat_interleave(group, dim=0)
        values = flat_values.index_select(0, slots).float().transpose(0, 1).repeat_interleave(group, dim=0)
        queries = q[first : first + query_len].float().transpose(0, 1)  # [num_heads, query_len, head_dim]
        # Causal from the context on: query j sits at position context_len + j and sees keys 0 .. that, which
        # is a causal mask aligned bottom-right (SDPA's is_causal aligns it top-left, only right without a
        # context). As a CausalBias rather than a dense mask, CUDA runs it in a fused kernel; a dense mask
        # fell back to the unfused math path, about 2x slower for 8 x 512 tokens on an H100.
        attended = F.scaled_dot_product_attention(
            queries[None], keys[None], values[None], attn_mask=causal_lower_right(query_len, seq_len), scale=scale
        )
        out[first : first + query_len] = attended[0].transpose(0, 1)
        live_tokens = first + query_len
    out[live_tokens:].zero_()  # padded tokens attend to nothing; zeros keep whatever follows finite


def _check_out(q: torch.Tensor, out: torch.Tensor) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [T, num_heads, head_dim], got shape {tuple(q.shape)}")
    if out.shape != q.shape:
        raise ValueError(f"out must have q's shape {tuple(q.shape)}, got {tuple(out.shape)}")


# What the model calls. Required (the default): the kernels read lengths on the host, so the op can never be
# captured inline. In a breakable capture it is the break: it runs eagerly between captured segments.
prefill_attention_break = hal.break_point(torch.ops.refmodel.prefill_attention.default, name="refmodel.prefill_attention")

# Piecewise graphs split here: the op writes into `out`, so the pieces around it keep fixed addresses.
hal.register_splitting_op(torch.ops.refmodel.prefill_attention.default)
