"""Paged prefill attention as a Triton kernel, safe to capture in a CUDA graph.

The twin of ``triton_decode_attention`` for packed prefill batches (see ``prefill_attention_reference`` for
the layout). Graph safety is again the point of its shape: where each request's tokens start, how many it has
and how far back it reads are all worked out inside the kernel from ``query_lens``, ``seq_lens`` and the block
tables in device memory. The host only knows shapes: the token count ``T``, the request slots ``R`` and the
model's sizes fix the grid, so one launch serves every batch that fits those buffers.

The grid walks query tiles of the packed token axis. A tile holds up to ``TOKENS_PER_QUERY_TILE`` tokens of a
single request (or of the padded tail), so a request of ``n`` tokens takes ``cdiv(n, TOKENS_PER_QUERY_TILE)``
tiles, and every tile of the batch fits in ``min(cdiv(T, TOKENS_PER_QUERY_TILE) + R, T)`` programs: each
request and the tail leave at most one partly filled tile, and no tile is empty. Programs past the batch's
last tile return at once. Each
program takes all the query heads of one KV head for its tokens, so K and V are read once per group (GQA).

This module imports triton at import time, like its decode twin; under ``TRITON_INTERPRET=1`` (set before
this module is first imported) the kernel runs on CPU tensors through Triton's interpreter.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

# Tile shapes: (largest padded head dim, query rows, keys per tile, warps), for 16-bit and float32 operands.
# Picked as the largest tiles that compile without register spills for sm_90a (ptxas -v on the PTX Triton 3.9
# emits; no GPU timing stands behind them yet). Gathered K/V tiles cost registers a contiguous flash-attention
# tile does not (a 64-bit address per element), so they run smaller than the Triton tutorial's 128 x 64 beyond
# 64 dims: 128 x 64 with 128 dims spilled 496 bytes, 64 x 64 with 4 warps 952. float32 dots run on FMA units
# ("ieee"), which take more registers still: 64 rows by 32 keys of 64 dims spilled 10 KB.
_TILES_16BIT = ((64, 128, 64, 8), (128, 64, 32, 8), (256, 32, 32, 8))
_TILES_FLOAT32 = ((64, 32, 32, 4), (128, 32, 32, 8), (256, 16, 16, 8))
_MIN_DOT_SIZE = 16  # tl.dot wants every dimension of at least 16

_LOG2_E = math.log2(math.e)


@triton.jit
def _paged_prefill_attention_kernel(
    q_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr, query_lens_ptr, seq_lens_ptr, out_ptr,
    scale_log2,
    num_tokens, num_requests, max_blocks,
    stride_q_row, stride_q_head, stride_q_dim,
    stride_k_block, stride_k_slot, stride_k_head, stride_k_dim,
    stride_v_block, stride_v_slot, stride_v_head, stride_v_dim,
    stride_bt_row, stride_bt_col,
    stride_query_lens, stride_seq_lens,
    stride_out_row, stride_out_head, stride_out_dim,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    QUERIES_PER_KV_HEAD: tl.constexpr,
    QUERIES_PER_KV_HEAD_PADDED: tl.constexpr,
    TOKENS_PER_QUERY_TILE: tl.constexpr,
    KEYS_PER_TILE: tl.constexpr,
    PIECES_PADDED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOTS_IN_FLOAT32: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)

    # --- which request (or the padded tail) this tile belongs to -------------------------------------------
    # The batch is cut into pieces: request i is piece i, and the rows past sum(query_lens) are piece R (the
    # tail). Every program redoes this prefix sum over at most a few dozen lengths: a handful of vector ops,
    # cheaper than a separate cumsum launch and nothing for the host to read.
    pieces = tl.arange(0, PIECES_PADDED)
    lens = tl.load(query_lens_ptr + pieces * stride_query_lens, mask=pieces < num_requests, other=0)
    lens = tl.maximum(lens, 0)
    tail_len = tl.maximum(num_tokens - tl.sum(lens, axis=0), 0)
    lens = tl.where(pieces == num_requests, tail_len, lens)
    tiles = (lens + TOKENS_PER_QUERY_TILE - 1) // TOKENS_PER_QUERY_TILE
    tile_ends = tl.cumsum(tiles, axis=0)
    # The first piece whose tiles end past this one (pieces with no tiles end where the previous one did, so
    # they are counted as before it and never chosen).
    piece = tl.sum((tile_ends <= tile).to(tl.int32), axis=0)
    if piece > num_requests:
        return  # one of the spare programs: the grid is sized for the worst split of T over R requests
    before = pieces < piece
    first_token = tl.sum(tl.where(before, lens, 0), axis=0)
    query_len = tl.sum(tl.where(pieces == piece, lens, 0), axis=0)
    # A request's tiles run last query tile first: under the causal mask a tile's work grows with its start,
    # and starting the longest programs first shortens the tail of the grid (flash attention does the same).
    tile_in_piece = tile - tl.sum(tl.where(before, tiles, 0), axis=0)
    tiles_in_piece = tl.sum(tl.where(pieces == piece, tiles, 0), axis=0)
    query_start = (tiles_in_piece - 1 - tile_in_piece) * TOKENS_PER_QUERY_TILE

    # --- this tile's rows: TOKENS_PER_QUERY_TILE tokens x the query heads of one KV head ----------------------
    # Row r is token r // QUERIES_PER_KV_HEAD_PADDED of the tile and query head r % QUERIES_PER_KV_HEAD_PADDED
    # of the group; the padded heads of a group that is not a power of two are masked out like spare tokens.
    rows = tl.arange(0, TOKENS_PER_QUERY_TILE * QUERIES_PER_KV_HEAD_PADDED)
    query_index = query_start + rows // QUERIES_PER_KV_HEAD_PADDED  # within the request
    head_in_group = rows % QUERIES_PER_KV_HEAD_PADDED
    head = kv_head * QUERIES_PER_KV_HEAD + head_in_group
    token = (first_token + query_index).to(tl.int64)  # int64: token * stride may pass 2**31 on long batches
    # `token < num_tokens` only matters for query_lens adding up to more than T (the reference rejects those):
    # without host reads the kernel cannot refuse them, but it must not write outside `out`.
    row_mask = (query_index < query_len) & (head_in_group < QUERIES_PER_KV_HEAD) & (token < num_tokens)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    dim_mask = dims < HEAD_DIM
    out_ptrs = (
        out_ptr + token[:, None] * stride_out_row + head[:, None] * stride_out_head + dims[None, :] * stride_out_dim
    )
    out_mask = row_mask[:, None] & dim_mask[None, :]

    if piece == num_requests:
        # Padded tokens belong to no request: zeros, written here so no separate fill of `out` is needed.
        zeros = tl.zeros([TOKENS_PER_QUERY_TILE * QUERIES_PER_KV_HEAD_PADDED, HEAD_DIM_PADDED], dtype=tl.float32)
        tl.store(out_ptrs, zeros.to(out_ptr.dtype.element_ty), mask=out_mask)
        return

    seq_len = tl.load(seq_lens_ptr + piece * stride_seq_lens)
    context_len = seq_len - query_len
    # Query j of the request sits at position context_len + j and sees keys 0 .. that position. Spare rows
    # take the position of the request's last query: they then see key 0 like every row, so no row's softmax
    # is over nothing (no NaN), and they are never stored.
    position = context_len + tl.minimum(query_index, query_len - 1)
    # Keys this tile needs: up to its last live query's position. Never past the block table, even for a
    # seq_len too large for it (the reference rejects those; the kernel must not read outside the table).
    key_end = tl.minimum(
        context_len + tl.minimum(query_start + TOKENS_PER_QUERY_TILE, query_len), max_blocks * BLOCK_SIZE
    )

    q = tl.load(
        q_ptr + token[:, None] * stride_q_row + head[:, None] * stride_q_head + dims[None, :] * stride_q_dim,
        mask=out_mask,
        other=0.0,
    )
    if DOTS_IN_FLOAT32:
        q = q.to(tl.float32)
    else:
        q = q.to(key_cache_ptr.dtype.element_ty)
    block_table_row = block_tables_ptr + piece * stride_bt_row

    # Online softmax in float32, in base 2 (scores carry log2(e), so exp2 does exp's work).
    running_max = tl.full([TOKENS_PER_QUERY_TILE * QUERIES_PER_KV_HEAD_PADDED], -float("inf"), dtype=tl.float32)
    running_sum = tl.zeros([TOKENS_PER_QUERY_TILE * QUERIES_PER_KV_HEAD_PADDED], dtype=tl.float32)
    acc = tl.zeros([TOKENS_PER_QUERY_TILE * QUERIES_PER_KV_HEAD_PADDED, HEAD_DIM_PADDED], dtype=tl.float32)

    for key_start in range(0, key_end, KEYS_PER_TILE):
        keys = key_start + tl.arange(0, KEYS_PER_TILE)
        key_mask = keys < key_end
        # A key tile may span cache blocks: each key finds its own block (int64: block * stride overflows
        # int32 on large caches). Keys past key_end are not loaded, so nothing past seq_len is ever read.
        blocks = tl.load(block_table_row + (keys // BLOCK_SIZE) * stride_bt_col, mask=key_mask, other=0).to(tl.int64)
        slots = keys % BLOCK_SIZE

        k = tl.load(  # [head_dim, keys]: transposed for q @ k
            key_cache_ptr + blocks[None, :] * stride_k_block + slots[None, :] * stride_k_slot
            + kv_head * stride_k_head + dims[:, None] * stride_k_dim,
            mask=key_mask[None, :] & dim_mask[:, None],
            other=0.0,
        )
        if DOTS_IN_FLOAT32:
            k = k.to(tl.float32)
        scores = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
        # Causal from the context on; keys past key_end lie past every row's position, so this masks them too.
        scores = tl.where(keys[None, :] <= position[:, None], scores, -float("inf"))

        # Key 0 sits in the first tile and every row sees it, so new_max is finite from the first tile on and
        # the first rescale factor exp2(-inf - new_max) is exactly 0; a later tile a row sees none of
        # leaves its max unchanged and adds exp2(-inf) = 0.
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        rescale = tl.exp2(running_max - new_max)
        weights = tl.exp2(scores - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(weights, axis=1)
        running_max = new_max

        v = tl.load(  # masked to zeros: a weight of 0 times a never-written slot (NaN) would still be NaN
            value_cache_ptr + blocks[:, None] * stride_v_block + slots[:, None] * stride_v_slot
            + kv_head * stride_v_head + dims[None, :] * stride_v_dim,
            mask=key_mask[:, None] & dim_mask[None, :],
            other=0.0,
        )
        if DOTS_IN_FLOAT32:
            v = v.to(tl.float32)
        # The weights go into the dot in V's dtype (16-bit on tensor cores, as flash attention does); the
        # accumulation stays float32.
        acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=DOT_PRECISION)

    out = acc / running_sum[:, None]  # every row saw key 0, so running_sum >= 1
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)


def runs_in_interpreter() -> bool:
    """Whether the kernel was built for Triton's CPU interpreter (TRITON_INTERPRET=1 when it was decorated)."""
    return type(_paged_prefill_attention_kernel).__name__ == "InterpretedFunction"


def paged_prefill_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> None:
    """Launch the kernel: write causal attention of the packed ``q`` over each request's cache into ``out``.

    Same arguments and result as ``graphhal.paged_attention.prefill_attention_reference`` (packed layout, GQA, zeros in the
    rows of padded tokens), except that the result is written into ``out`` [T, num_heads, head_dim] and that
    nothing is read on the host: lengths and tables stay in device memory, so a batch the reference would
    reject (lengths past T or past the block table) is not refused, only kept from reading or writing out of
    bounds. Supports float32, float16 and bfloat16 (q, caches and out share one dtype); scores, softmax and
    accumulation are float32.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_requests, max_blocks = block_tables.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    # Everything but the grid depends only on the model's sizes, R and the dtype: worked out (and checked)
    # once per shape instead of on every launch, which runs once per layer per step.
    constants = _launch_constants(head_dim, block_size, num_heads, num_kv_heads, num_requests, key_cache.dtype)
    if num_tokens == 0:
        return
    tiles = min(-(-num_tokens // constants["TOKENS_PER_QUERY_TILE"]) + num_requests, num_tokens)
    _paged_prefill_attention_kernel[(tiles, num_kv_heads)](
        q, key_cache, value_cache, block_tables, query_lens, seq_lens, out,
        float(scale) * _LOG2_E,
        num_tokens, num_requests, max_blocks,
        *q.stride(),
        *key_cache.stride(),
        *value_cache.stride(),
        *block_tables.stride(),
        *query_lens.stride(),
        *seq_lens.stride(),
        *out.stride(),
        **constants,
    )


@functools.cache
def _launch_constants(
    head_dim: int, block_size: int, num_heads: int, num_kv_heads: int, num_requests: int, dtype: torch.dtype
) -> dict[str, object]:
    """The launch's keyword arguments (constexprs, num_warps) for one model shape, request count and dtype.

    The caller unpacks the returned dict into the launch and never changes it.
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"paged_prefill_attention supports float32, float16 and bfloat16, got {dtype}")
    head_dim_padded = max(_MIN_DOT_SIZE, triton.next_power_of_2(head_dim))
    queries_per_kv_head = num_heads // num_kv_heads
    group_padded = triton.next_power_of_2(queries_per_kv_head)
    tiles = _TILES_FLOAT32 if dtype == torch.float32 else _TILES_16BIT
    # The first shape for heads this wide; wider heads than any listed take the last (smallest) one.
    _, query_rows, keys_per_tile, num_warps = next((t for t in tiles if head_dim_padded <= t[0]), tiles[-1])
    # A tile's rows are its tokens times the group's heads; at least 16 of them for tl.dot.
    tokens_per_query_tile = max(1, query_rows // group_padded, _MIN_DOT_SIZE // group_padded)
    return dict(
        HEAD_DIM=head_dim,
        HEAD_DIM_PADDED=head_dim_padded,
        BLOCK_SIZE=block_size,
        QUERIES_PER_KV_HEAD=queries_per_kv_head,
        QUERIES_PER_KV_HEAD_PADDED=group_padded,
        TOKENS_PER_QUERY_TILE=tokens_per_query_tile,
        KEYS_PER_TILE=keys_per_tile,
        # The requests and the padded tail, in one power-of-two vector (of 16 at least, like every other
        # vector here: nothing is saved below that).
        PIECES_PADDED=max(16, triton.next_power_of_2(num_requests + 1)),
        # float32 stays float32 on tensor-core GPUs ("ieee", not tf32's 10-bit mantissa): the reference is
        # float32 and tests hold float32 to 1e-5. For 16-bit operands the setting has no effect.
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        # Triton 3.9's interpreter multiplies bfloat16 tl.dot operands as their raw uint16 bits (results off by
        # 1e10), so interpreted bfloat16 dots run on float32 copies; compiled kernels use bfloat16 tensor cores.
        DOTS_IN_FLOAT32=dtype == torch.bfloat16 and runs_in_interpreter(),
        num_warps=num_warps,
    )
