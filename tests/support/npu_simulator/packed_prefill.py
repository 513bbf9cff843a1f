"""The SIMULATED fused infer-attention op in the packed "TND" layout over a paged KV cache, on the CPU.

What it checks is what op-plugin documents for ``npu_fused_infer_attention_score`` (and ``_v2``) in layout TND
(docs/context/torch_npu-npu_fused_infer_attention_score.md) at the commit the installed profile's line pins,
each line its own rules (``TorchNpuProfile.fia_tnd_*``), and what vllm-ascend found on hardware:

- Page attention (a ``block_table``) in TND: only from 7213914d (torch_npu 7.3). 480bc431 (7.1) and 691bf15a
  (7.2) list "不支持...page attention" for TND without rope (and no graph mode): on those lines the call is
  refused. TND without a block table is not simulated.
- query ``[T, N, D]``, contiguous; without rope D is 192 (7.1) or 128/192 (7.2 on; this model's K and V share
  the query's D); bfloat16 only before 7.3, float16 too from 7.3. key/value a paged cache
  ``[num_blocks, block_size, KV_N * D]`` (BnBsH) with ``block_table`` int32 ``[B, max_blocks]``; ``block_size`` a
  multiple of 16, at most 1024 ("page attention场景下仅支持blocksize为16对齐且小于等于1024", 7213914d).
- ``actual_seq_lengths`` (v2 ``actual_seq_qlen``): required; its element count is the batch B (at most 4096);
  each element is the cumulative query length up to and including that request, so "a later value >= an
  earlier one" and none negative: a request with no query tokens repeats the previous end. T is the sum of
  the query lengths, so the last end must be T (vllm-ascend: FIA fails with error 561002 otherwise, and it
  inserts a dummy request to make it so, attention_v1.py L352-369 at main 182b75ea).
- ``actual_seq_lengths_kv`` (v2 ``actual_seq_kvlen``): required, one per request (with page attention "the
  actual length of each batch", not cumulative), each at most the block table's width x ``block_size``;
  the cache must hold at least the blocks those lengths need together ("blocknum >= the sum of each batch's
  blocks").
- ``sparse_mode``: 0 without a mask (every request attends to all its KV), or 3, rightDownCausal: query row
  ``i`` of a request with ``q`` rows and ``kv`` KV tokens sees KV positions ``0 .. kv - q + i`` (causal from the
  cached context on). Mode 3 takes the "optimized" mask: ``(2048, 2048)`` (or with leading 1s), bool/int8/uint8,
  1 above the diagonal ("the user guarantees it is lower triangular"; vllm-ascend builds
  ``torch.triu(torch.ones(2048, 2048), diagonal=1).to(torch.int8)``). Other modes are not simulated.

Not documented, so chosen here and said so: a query row that sees no KV token (its request's KV length is
0, or in mode 3 a row above the diagonal when ``kv < q``) gets zeros. vllm-ascend ran TND paged chunked
prefill with sparse_mode 3 on torch-npu 2.7.1 (v0.11.0-dev attention_v1.py), outside what 691bf15a documents;
the simulator follows the document, not that experience.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from support.npu_simulator import state
from support.npu_simulator.errors import NotSimulatedError

MAX_BATCH = 4096
MASK_SIZE = 2048
MASK_DTYPES = (torch.bool, torch.int8, torch.uint8)
_checked_masks = WeakIdKeyDictionary()  # mask -> its version when it was found triangular (checked once)


def attention(op, query, key, value, block_table, query_ends, kv_lengths, num_heads, num_kv_heads, scale, block_size, atten_mask, sparse_mode):  # type: ignore[no-untyped-def]  # noqa: E501
    """Checks the call (module docstring) and returns ``(output [T, N, D], kv_lengths)``."""
    profile = state.current().profile
    line = f"torch_npu {profile.name} (op-plugin {profile.op_plugin})"
    if not profile.fia_tnd_page_attention:
        raise ValueError(
            f"{op}: {line} documents no page attention (block_table) in layout TND without rope (from op-plugin "
            "7213914d, torch_npu 7.3, it does)"
        )
    if query.dim() != 3 or query.shape[1] != num_heads:
        raise ValueError(f"{op}: TND takes the query as [T, num_heads={num_heads}, D], got {tuple(query.shape)}")
    tokens, _, head_dim = query.shape
    if head_dim not in profile.fia_tnd_head_dims:
        dims = " or ".join(map(str, profile.fia_tnd_head_dims))
        raise ValueError(f"{op}: {line} takes a head dim of {dims} in TND without rope, got {head_dim}")
    if str(query.dtype).removeprefix("torch.") not in profile.fia_tnd_dtypes:
        raise TypeError(f"{op}: {line} takes {', '.join(profile.fia_tnd_dtypes)} in TND, got {query.dtype}")
    if not (query.is_contiguous() and key.is_contiguous() and value.is_contiguous()):
        raise ValueError(f"{op}: query, key and value must be contiguous")
    if num_heads % num_kv_heads:
        raise ValueError(f"{op}: num_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")
    if key.dim() != 3 or key.shape != value.shape or key.shape[2] != num_kv_heads * head_dim:
        raise NotSimulatedError(
            f"{op}: TND is simulated over a paged cache [num_blocks, block_size, KV_N * D] only, got key "
            f"{tuple(key.shape)}, value {tuple(value.shape)}"
        )
    if block_size % 16 or not 0 < block_size <= 1024:
        raise ValueError(f"{op}: TND with page attention takes a block_size that is a multiple of 16, at most 1024")
    if block_table.dtype != torch.int32 or block_table.dim() != 2:
        raise TypeError(f"{op}: block_table must be 2-D int32, got {block_table.dtype} {tuple(block_table.shape)}")
    causal = checked_sparse_mode(op, sparse_mode, atten_mask)
    query_ends = _checked_query_ends(op, query_ends, tokens)
    batch = len(query_ends)
    if block_table.shape[0] != batch:
        raise ValueError(f"{op}: block_table has {block_table.shape[0]} rows for a batch of {batch}")
    capacity = block_table.shape[1] * block_size
    kv_lengths = _checked_kv_lengths(op, kv_lengths, batch, capacity)
    blocks_needed = sum(-(-length // block_size) for length in kv_lengths)
    if blocks_needed > key.shape[0]:
        raise ValueError(f"{op}: the KV lengths need {blocks_needed} blocks together but the cache has {key.shape[0]}")
    state.current().log_launch(op, kv_lengths, query_ends)
    key_cache = key.reshape(key.shape[0], block_size, num_kv_heads, head_dim)
    value_cache = value.reshape(value.shape[0], block_size, num_kv_heads, head_dim)
    output = packed_paged_attention(query, key_cache, value_cache, block_table, query_ends, kv_lengths, scale, causal)
    return output, kv_lengths


def checked_sparse_mode(op: str, sparse_mode: int, atten_mask: torch.Tensor | None) -> bool:
    """Whether the call is causal (mode 3) or not (mode 0), after checking its mask."""
    if sparse_mode == 0:
        if atten_mask is not None:
            raise NotSimulatedError(f"{op}: sparse_mode 0 with an atten_mask is not simulated in TND")
        return False
    if sparse_mode != 3:
        raise NotSimulatedError(f"{op}: sparse_mode {sparse_mode} is not simulated in TND (0 and 3 are)")
    if atten_mask is None:
        raise ValueError(f"{op}: sparse_mode 3 needs the optimized atten_mask ({MASK_SIZE}x{MASK_SIZE})")
    if atten_mask.shape not in ((MASK_SIZE, MASK_SIZE), (1, MASK_SIZE, MASK_SIZE), (1, 1, MASK_SIZE, MASK_SIZE)):
        shape = tuple(atten_mask.shape)
        raise ValueError(f"{op}: sparse_mode 3 takes a ({MASK_SIZE}, {MASK_SIZE}) atten_mask, got {shape}")
    if atten_mask.dtype not in MASK_DTYPES:
        raise TypeError(f"{op}: atten_mask must be bool, int8 or uint8, got {atten_mask.dtype}")
    if _checked_masks.get(atten_mask) != atten_mask._version:
        expected = torch.ones(MASK_SIZE, MASK_SIZE, dtype=torch.bool).triu_(diagonal=1)
        if not torch.equal(atten_mask.reshape(MASK_SIZE, MASK_SIZE).bool(), expected):
            raise ValueError(f"{op}: sparse_mode 3 takes the triangular mask, 1 above the diagonal and 0 elsewhere")
        _checked_masks[atten_mask] = atten_mask._version
    return True


def _checked_query_ends(op: str, query_ends: Any, tokens: int) -> list[int]:
    if query_ends is None:
        raise ValueError(f"{op}: the TND layout needs the cumulative query lengths (actual_seq_lengths)")
    ends = [int(end) for end in query_ends]
    if not 0 < len(ends) <= MAX_BATCH:
        raise ValueError(f"{op}: TND takes 1 to {MAX_BATCH} cumulative query lengths, got {len(ends)}")
    previous = 0
    for end in ends:
        if end < previous:
            raise ValueError(f"{op}: cumulative query lengths must not decrease and not be negative, got {ends}")
        previous = end
    if ends[-1] != tokens:
        raise ValueError(
            f"{op}: the cumulative query lengths end at {ends[-1]} but the query has T = {tokens} rows (TND: T is "
            "their sum)"
        )
    return ends


def _checked_kv_lengths(op: str, lengths: Any, batch: int, capacity: int) -> list[int]:
    if lengths is None:
        raise ValueError(f"{op}: the TND layout needs the KV lengths (actual_seq_lengths_kv)")
    lengths = [int(length) for length in lengths]
    if len(lengths) != batch:
        raise ValueError(f"{op}: {len(lengths)} KV lengths for a batch of {batch} (the query lengths' count)")
    for length in lengths:
        if not 0 <= length <= capacity:
            raise ValueError(f"{op}: KV length {length} outside 0..{capacity} (block table width x block_size)")
    return lengths


def packed_paged_attention(query, key_cache, value_cache, block_table, query_ends, kv_lengths, scale, causal):  # type: ignore[no-untyped-def]  # noqa: E501
    """query [T, N, D]; caches [blocks, block_size, KV_N, D]; returns [T, N, D] in the query's dtype."""
    _, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    flat_keys = key_cache.reshape(-1, num_kv_heads, head_dim)
    flat_values = value_cache.reshape(-1, num_kv_heads, head_dim)
    out = torch.zeros_like(query)
    start = 0
    for row, (end, length) in enumerate(zip(query_ends, kv_lengths)):
        rows, first = end - start, start
        start = end
        if rows == 0 or length == 0:
            continue
        blocks = block_table[row, : -(-length // block_size)].long()
        slots = (blocks[:, None] * block_size + torch.arange(block_size)).reshape(-1)[:length]
        keys = flat_keys.index_select(0, slots).float().permute(1, 0, 2)[:, None]  # [KV_N, 1, kv, D]
        values = flat_values.index_select(0, slots).float().permute(1, 0, 2)[:, None]
        queries = query[first:end].float().reshape(rows, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
        scores = queries @ keys.transpose(-1, -2) * scale  # [KV_N, group, rows, kv]
        if causal:  # rightDownCausal: row i sees positions 0 .. kv - rows + i
            visible = torch.arange(length)[None, :] <= torch.arange(rows)[:, None] + (length - rows)
            scores = scores.masked_fill(~visible, float("-inf"))
        probabilities = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row that sees nothing: zeros
        attended = probabilities @ values  # [KV_N, group, rows, D]
        out[first:end] = attended.permute(2, 0, 1, 3).reshape(rows, num_heads, head_dim).to(query.dtype)
    return out
