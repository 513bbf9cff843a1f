"""Paged decode attention written as plain tensor math: the definition every kernel is checked against.

It runs on any device and has no data-dependent shapes (every row reads the full width of its block table
and masks what lies past its ``seq_len``), so it is also safe inside a captured device graph, just not fast.
"""

from __future__ import annotations

import torch


def decode_attention_reference(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of each row's new query tokens over that row's cached tokens.

    q:            [batch, num_heads, head_dim] (one new token per row), or [batch, query_tokens, num_heads,
                  head_dim]: ``query_tokens`` new tokens per row (speculative verification), causal among them
    key_cache:    [num_blocks, block_size, num_kv_heads, head_dim] (value_cache likewise)
    block_tables: [batch, max_blocks] int, the cache blocks holding each row's tokens in order
    seq_lens:     [batch] int, how many cached tokens each row attends to (its new tokens included)
    scale:        multiplier on q.k, usually head_dim ** -0.5

    Returns q's shape in q's dtype, computed in float32. Query head ``h`` reads KV head
    ``h // (num_heads // num_kv_heads)`` (grouped-query attention). With ``q`` new tokens, token ``i`` of a row
    (the ``i``-th of the last ``q`` cached tokens) attends to the first ``seq_len - (q - 1 - i)``. A row with
    ``seq_len == 0`` attends to nothing and returns zeros: that is what padded batch rows carry, and they must
    stay finite (so does any token whose causal length is 0 or less).
    """
    if q.dim() == 4:
        return _multi_token_reference(q, key_cache, value_cache, block_tables, seq_lens, scale)
    return _multi_token_reference(q[:, None], key_cache, value_cache, block_tables, seq_lens, scale)[:, 0]


def causal_lengths(seq_lens: torch.Tensor, query_tokens: int) -> torch.Tensor:
    """[batch, query_tokens] int64: how many cached tokens query token ``i`` of each row attends to,
    ``seq_len - (query_tokens - 1 - i)``, never below 0."""
    offsets = torch.arange(query_tokens - 1, -1, -1, device=seq_lens.device)
    return (seq_lens.long()[:, None] - offsets[None, :]).clamp_min(0)


def _multi_token_reference(q, key_cache, value_cache, block_tables, seq_lens, scale):  # type: ignore[no-untyped-def]
    batch, query_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_heads // num_kv_heads
    max_blocks = block_tables.shape[1]
    num_tokens = max_blocks * block_size

    blocks = block_tables.long()
    keys = key_cache[blocks].reshape(batch, num_tokens, num_kv_heads, head_dim).float()
    values = value_cache[blocks].reshape(batch, num_tokens, num_kv_heads, head_dim).float()

    q_grouped = q.float().reshape(batch, query_tokens, num_kv_heads, group, head_dim)
    scores = torch.einsum("bqkgd,btkd->bqkgt", q_grouped, keys) * scale

    token_index = torch.arange(num_tokens, device=q.device)
    lengths = causal_lengths(seq_lens, query_tokens)  # [batch, query_tokens]
    valid = token_index[None, None, :] < lengths[:, :, None]  # [batch, query_tokens, tokens]
    # A finite fill instead of -inf: a row with no valid token then softmaxes to a uniform spread (not NaN),
    # and multiplying by `valid` afterwards turns it into exact zeros.
    valid5 = valid[:, :, None, None, :]
    scores = scores.masked_fill(~valid5, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1) * valid5
    # Slots past seq_len hold whatever was there (the null block's padding writes, stale tokens); zero them so
    # even a NaN left there cannot leak through a 0 * NaN.
    any_valid = token_index[None, :] < seq_lens.long()[:, None]
    values = values.masked_fill(~any_valid[:, :, None, None], 0.0)

    out = torch.einsum("bqkgt,btkd->bqkgd", probs, values)
    return out.reshape(batch, query_tokens, num_heads, head_dim).to(q.dtype)
