"""Paged decode attention as a Triton kernel, safe to capture in a CUDA graph.

Graph safety is the point of its shape: the batch's sequence lengths and block tables are read from device
memory inside the kernel (the key loop runs to the loaded ``seq_len``), so nothing the host knows about a
particular batch is baked into the launch. Only the batch size (the grid) and the model's sizes are.

This module imports triton at import time; only the CUDA path of the attention op and the tests import it,
so ``import graphhal.paged_attention`` works without triton. Under ``TRITON_INTERPRET=1`` (set before this module is first
imported) the kernel runs on CPU tensors through Triton's interpreter, which is how CPU tests check it.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Each loop iteration scores one tile of tokens: a [tokens, head_dim] slab of K and of V in registers. A
# tile may span several cache blocks (each token finds its block through the block table), so page size and
# tile size are independent. Measured on an H100 (default config, contexts up to 1024, us per layer at
# batch 1 / 64): 128-token tiles with 2 warps took 17 / 51 in bf16 and, with 4 warps, 17 / 86 in fp32,
# against 27 / 95 and 29 / 97 for 32-token tiles with 4 warps. So: about 8K elements a tile, and one warp
# per 8 KiB of tile.
_TILE_ELEMENTS = 8192
_MAX_TOKENS_PER_TILE = 128
_TILE_BYTES_PER_WARP = 8192


def _tokens_per_tile(head_dim_padded: int) -> int:
    return max(16, min(_MAX_TOKENS_PER_TILE, _TILE_ELEMENTS // head_dim_padded))


def _num_warps(tile_bytes: int) -> int:
    return max(1, min(8, tile_bytes // _TILE_BYTES_PER_WARP))


@triton.jit
def _paged_decode_attention_kernel(
    q_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr,
    scale,
    stride_q_row, stride_q_token, stride_q_head, stride_q_dim,
    stride_k_block, stride_k_slot, stride_k_head, stride_k_dim,
    stride_v_block, stride_v_slot, stride_v_head, stride_v_dim,
    stride_bt_row, stride_bt_col,
    stride_out_row, stride_out_token, stride_out_head, stride_out_dim,
    QUERY_TOKENS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    QUERIES_PER_KV_HEAD: tl.constexpr,
    TOKENS_PER_TILE: tl.constexpr,
):
    # One program per (row, query token) and query head. Query token i of a row is the i-th of its last
    # QUERY_TOKENS cached tokens: it attends causally, to the first seq_len - (QUERY_TOKENS - 1 - i).
    row_token = tl.program_id(0)
    row = row_token // QUERY_TOKENS
    token = row_token % QUERY_TOKENS
    head = tl.program_id(1)
    kv_head = head // QUERIES_PER_KV_HEAD

    dims = tl.arange(0, HEAD_DIM_PADDED)
    dim_mask = dims < HEAD_DIM
    q = tl.load(
        q_ptr + row * stride_q_row + token * stride_q_token + head * stride_q_head + dims * stride_q_dim,
        mask=dim_mask,
        other=0.0,
    )
    q = q.to(tl.float32)

    seq_len = tl.maximum(tl.load(seq_lens_ptr + row) - (QUERY_TOKENS - 1 - token), 0)

    # Online softmax state in float32: running max, running denominator, running weighted sum of values.
    running_max = -float("inf")
    running_sum = 0.0
    acc = tl.zeros([HEAD_DIM_PADDED], dtype=tl.float32)

    for tile_start in range(0, seq_len, TOKENS_PER_TILE):
        tokens = tile_start + tl.arange(0, TOKENS_PER_TILE)
        token_mask = tokens < seq_len
        blocks = tl.load(
            block_tables_ptr + row * stride_bt_row + (tokens // BLOCK_SIZE) * stride_bt_col,
            mask=token_mask,
            other=0,
        ).to(tl.int64)  # int64: block * stride overflows int32 on large caches
        slots = tokens % BLOCK_SIZE
        load_mask = token_mask[:, None] & dim_mask[None, :]

        k = tl.load(
            key_cache_ptr + blocks[:, None] * stride_k_block + slots[:, None] * stride_k_slot
            + kv_head * stride_k_head + dims[None, :] * stride_k_dim,
            mask=load_mask,
            other=0.0,
        ).to(tl.float32)
        scores = tl.sum(k * q[None, :], axis=1) * scale
        scores = tl.where(token_mask, scores, -float("inf"))

        # Every tile holds at least one valid token (the loop stops at seq_len), so new_max is finite and
        # the first tile's rescale factor exp(-inf - new_max) is exactly 0.
        new_max = tl.maximum(running_max, tl.max(scores, axis=0))
        rescale = tl.exp(running_max - new_max)
        weights = tl.exp(scores - new_max)

        v = tl.load(
            value_cache_ptr + blocks[:, None] * stride_v_block + slots[:, None] * stride_v_slot
            + kv_head * stride_v_head + dims[None, :] * stride_v_dim,
            mask=load_mask,
            other=0.0,
        ).to(tl.float32)
        acc = acc * rescale + tl.sum(weights[:, None] * v, axis=0)
        running_sum = running_sum * rescale + tl.sum(weights, axis=0)
        running_max = new_max

    # seq_len == 0 (a padded row): the loop never ran, acc is all zeros, and dividing by 1 keeps them zeros.
    denominator = tl.where(running_sum > 0.0, running_sum, 1.0)
    out = acc / denominator
    tl.store(
        out_ptr + row * stride_out_row + token * stride_out_token + head * stride_out_head + dims * stride_out_dim,
        out.to(out_ptr.dtype.element_ty),
        mask=dim_mask,
    )


def runs_in_interpreter() -> bool:
    """Whether the kernel was built for Triton's CPU interpreter (TRITON_INTERPRET=1 when it was decorated)."""
    return type(_paged_decode_attention_kernel).__name__ == "InterpretedFunction"


def paged_decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> None:
    """Launch the kernel: write attention of ``q`` over each row's cached tokens into ``out``.

    Same arguments and result as ``graphhal.paged_attention.decode_attention_reference`` (shapes, GQA, causal
    lengths of several query tokens, zeros for ``seq_len == 0``), except that the result is written into ``out``
    (q's shape: [batch, num_heads, head_dim] or [batch, query_tokens, num_heads, head_dim]). One program per
    (row, query token, head): the grid is the batch's token count, fixed per bucket. Supports float32,
    float16 and bfloat16 (q, caches and out share one dtype); math is float32.
    """
    if q.dim() == 4:
        batch, query_tokens, num_heads, head_dim = q.shape
        q_strides, out_strides = q.stride(), out.stride()
    else:
        batch, num_heads, head_dim = q.shape
        query_tokens = 1
        q_strides = (q.stride(0), 0, q.stride(1), q.stride(2))
        out_strides = (out.stride(0), 0, out.stride(1), out.stride(2))
    _, block_size, num_kv_heads, _ = key_cache.shape
    # The constexprs and warp count depend only on the model's sizes: worked out (and checked) once per shape
    # instead of on every launch, which runs once per layer per step and twice per captured bucket.
    constants = _launch_constants(head_dim, block_size, num_heads, num_kv_heads, key_cache.element_size())
    if seq_lens.dim() != 1 or seq_lens.stride(0) != 1:
        raise ValueError("seq_lens must be a contiguous 1-D tensor")
    if batch == 0:
        return

    _paged_decode_attention_kernel[(batch * query_tokens, num_heads)](
        q, key_cache, value_cache, block_tables, seq_lens, out,
        float(scale),
        *q_strides,
        *key_cache.stride(),
        *value_cache.stride(),
        *block_tables.stride(),
        *out_strides,
        QUERY_TOKENS=query_tokens,
        **constants,
    )


@functools.cache
def _launch_constants(head_dim: int, block_size: int, num_heads: int, num_kv_heads: int, element_size: int) -> dict[str, int]:
    """The launch's keyword arguments (constexprs and num_warps) for one model shape and cache dtype size.

    The caller unpacks the returned dict into the launch and never changes it.
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    head_dim_padded = triton.next_power_of_2(head_dim)
    tokens_per_tile = _tokens_per_tile(head_dim_padded)
    return dict(
        HEAD_DIM=head_dim,
        HEAD_DIM_PADDED=head_dim_padded,
        BLOCK_SIZE=block_size,
        QUERIES_PER_KV_HEAD=num_heads // num_kv_heads,
        TOKENS_PER_TILE=tokens_per_tile,
        num_warps=_num_warps(tokens_per_tile * head_dim_padded * element_size),
    )
