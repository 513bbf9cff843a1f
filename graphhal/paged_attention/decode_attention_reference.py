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
    """Attention of one new query token per row over that row's cached tokens.

    q:            [batch, num_heads, head_dim]
    key_cache:    [num_blocks, block_size, num_kv_heads, head_dim] (value_cache likewise)
    block_tables: [batch, max_blocks] int, the cache blocks holding each row's tokens in order
    seq_lens:     [batch] int, how many cached tokens each row attends to (the new token included)
    scale:        multiplier on q.k, usually head_dim ** -0.5

    Returns [batch, num_heads, head_dim] in q's dtype, computed in float32. Query head ``h`` reads KV head
    ``h // (num_heads // num_kv_heads)`` (grouped-query attention). A row with ``seq_len == 0`` attends to
    nothing and returns zeros: that is what padded batch rows carry, and they must stay finite.
    """
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_heads // num_kv_heads
    max_blocks = block_tables.shape[1]
    num_tokens = max_blocks * block_size

    blocks = block_tables.long()
    keys = key_cache[blocks].reshape(batch, num_tokens, num_kv_heads, head_dim).float()
    values = value_cache[blocks].reshape(batch, num_tokens, num_kv_heads, head_dim).float()

    q_grouped = q.float().reshape(batch, num_kv_heads, group, head_dim)
    scores = torch.einsum("bkgd,btkd->bkgt", q_grouped, keys) * scale

    token_index = torch.arange(num_tokens, device=q.device)
    valid_tokens = token_index[None, :] < seq_lens.long()[:, None]  # [batch, tokens]
    valid = valid_tokens[:, None, None, :]
    # A finite fill instead of -inf: a row with no valid token then softmaxes to a uniform spread (not NaN),
    # and multiplying by `valid` afterwards turns it into exact zeros.
    scores = scores.masked_fill(~valid, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1) * valid
    # Slots past seq_len hold whatever was there (the null block's padding writes, stale tokens); zero them so
    # even a NaN left there cannot leak through a 0 * NaN.
    values = values.masked_fill(~valid_tokens[:, :, None, None], 0.0)

    out = torch.einsum("bkgt,btkd->bkgd", probs, values)
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)
