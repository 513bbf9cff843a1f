"""Paged prefill attention written out token by token: the definition the prefill kernels are checked against.

A prefill batch is packed: the new (query) tokens of every request sit back to back in one ``[T, ...]``
tensor, request ``i``'s rows starting at ``sum(query_lens[:i])``. The request dimension ``R`` is a fixed
maximum: a request with ``query_len == 0`` is padding, and rows at or past ``sum(query_lens)`` are padded
tokens that belong to no request. ``prefill_layout`` reads that layout on the host and rejects batches that
do not describe one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

import hal


class PrefillRequest(NamedTuple):
    """Where one live request of a packed batch sits."""

    index: int  # row of the request slots (query_lens, seq_lens, block_tables)
    first_token: int  # its first query token's row in q
    query_len: int  # new tokens
    seq_len: int  # cached context + new tokens

    @property
    def context_len(self) -> int:
        return self.seq_len - self.query_len


def prefill_layout(
    num_tokens: int, block_size: int, block_tables: torch.Tensor, query_lens: torch.Tensor, seq_lens: torch.Tensor
) -> list[PrefillRequest]:
    """The live requests of a packed batch of ``num_tokens`` rows, read on the host; ValueError if inconsistent.

    Reads ``query_lens`` and ``seq_lens`` on the host (a device sync, once per step: ``hal.host_list``): only for
    code that is never captured into a graph.
    """
    if block_tables.dim() != 2 or query_lens.dim() != 1 or seq_lens.dim() != 1:
        raise ValueError(
            f"expected block_tables [R, max_blocks], query_lens [R] and seq_lens [R], got shapes "
            f"{tuple(block_tables.shape)}, {tuple(query_lens.shape)}, {tuple(seq_lens.shape)}"
        )
    if not block_tables.shape[0] == query_lens.shape[0] == seq_lens.shape[0]:
        raise ValueError(
            f"block_tables, query_lens and seq_lens must have one row per request, got "
            f"{block_tables.shape[0]}, {query_lens.shape[0]} and {seq_lens.shape[0]} rows"
        )
    max_tokens_per_request = block_tables.shape[1] * block_size
    requests = []
    first_token = 0
    for index, (query_len, seq_len) in enumerate(zip(hal.host_list(query_lens), hal.host_list(seq_lens))):
        if query_len < 0 or seq_len < 0:
            raise ValueError(f"request {index}: negative length (query_len {query_len}, seq_len {seq_len})")
        if query_len == 0:
            continue  # a padding request, whatever its seq_len
        if seq_len < query_len:
            raise ValueError(
                f"request {index}: seq_len {seq_len} is less than query_len {query_len} "
                "(seq_len counts the cached context plus the new tokens)"
            )
        if seq_len > max_tokens_per_request:
            raise ValueError(
                f"request {index}: seq_len {seq_len} does not fit its block table "
                f"({block_tables.shape[1]} blocks of {block_size} tokens)"
            )
        requests.append(PrefillRequest(index, first_token, query_len, seq_len))
        first_token += query_len
    if first_token > num_tokens:
        raise ValueError(f"query_lens add up to {first_token} tokens but the batch has only {num_tokens} rows")
    return requests


def prefill_attention_reference(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each request's new tokens over that request's cached tokens, one token at a time.

    q:            [T, num_heads, head_dim], packed query tokens (see the module docstring)
    key_cache:    [num_blocks, block_size, num_kv_heads, head_dim] (value_cache likewise); the new tokens'
                  K/V are already in it
    block_tables: [R, max_blocks] int, the cache blocks holding each request's tokens in order
    query_lens:   [R] int, new tokens per request (0 = padding request)
    seq_lens:     [R] int, cached context plus new tokens per request
    scale:        multiplier on q.k

    Query token ``j`` of request ``i`` sits at position ``context_len + j`` and attends to that request's
    cache positions ``0 .. context_len + j``. Query head ``h`` reads KV head ``h // (num_heads //
    num_kv_heads)``. Computed in float32; returns [T, num_heads, head_dim] in q's dtype, with zeros in the
    rows of padded tokens.
    """
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for request in prefill_layout(num_tokens, block_size, block_tables, query_lens, seq_lens):
        positions = torch.arange(request.seq_len, device=q.device)
        blocks = block_tables[request.index].long()[positions // block_size]
        keys = key_cache[blocks, positions % block_size].float().repeat_interleave(group, dim=1)  # [seq, heads, dim]
        values = value_cache[blocks, positions % block_size].float().repeat_interleave(group, dim=1)
        for j in range(request.query_len):
            visible = request.context_len + j + 1  # itself and everything before it
            query = q[request.first_token + j].float()  # [heads, dim]
            probs = torch.softmax(torch.einsum("hd,thd->ht", query, keys[:visible]) * scale, dim=-1)
            out[request.first_token + j] = torch.einsum("ht,thd->hd", probs, values[:visible])
    return out.to(q.dtype)
