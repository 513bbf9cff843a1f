"""Paged prefill attention in plain torch ops that never read a length on the host.

The CPU kernel of ``graphhal::prefill_attention``, and one that runs on any device: every shape it makes
depends only on tensor shapes (``T``, ``R``, the block tables' width), never on the batch's lengths, so a
graph recorded or captured around it replays correctly for any batch that fits its buffers.

It cuts the packed tokens into tiles the way the Triton kernel (``graphhal.paged_attention.triton_prefill_attention``) does:
``TOKENS_PER_TILE`` tokens of one request per tile, so ``min(cdiv(T, TOKENS_PER_TILE) + R, T)`` tiles cover
any split of ``T`` tokens over ``R`` requests. Each tile attends, as dense matmuls, to every slot of its
request's block table under a causal mask. The waste is where the graph-safety is paid for: tiles score the
whole table width (not only ``seq_len``), and partly filled or spare tiles score rows that are thrown away.

Why tiles of one request rather than the simpler alternatives (2-core CPU, one thread, 16 heads over 8 KV
heads of 64 dims, tables of 2048 slots, 512 tokens in 8 requests of 64, seconds per call): every token
against every request's keys, masked to its own, 0.99 (R times the work); every token gathering its own
request's keys, 5.3 (a copy of the table per token); tiles of 16 tokens, 0.12. One SDPA per request over
only its own tokens, which needs the lengths on the host, takes 0.003: where nothing is captured, that is
the faster kernel.
"""

from __future__ import annotations

import torch

# Tokens per tile: small enough that partly filled tiles waste little (at most R of them), large enough that
# the per-tile matmuls stay efficient. 16 against 32 and 64 was faster for 8 and 64 requests, within 10% for 1.
TOKENS_PER_TILE = 16
# Score elements per chunk of tiles (1 MiB of float32): a chunk's scores and keys stay in cache. Chunks of 4 and
# 16 MiB were 2-4x slower in the measurement above; small batches fit one chunk.
SCORES_PER_CHUNK = 1 << 18


def prefill_attention_masked(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Same arguments and result as ``graphhal.paged_attention.prefill_attention_reference``, without a host read.

    Lengths, offsets and block tables stay tensors on q's device; a batch the reference would reject
    (lengths past ``T`` or past the block table) is not refused, and rows that would then fall outside the
    batch are dropped. Computed in float32; returns [T, num_heads, head_dim] in q's dtype, zeros in the
    rows of padded tokens.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    num_requests, max_blocks = block_tables.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if num_tokens == 0 or num_requests == 0:
        return torch.zeros_like(q)
    group = num_heads // num_kv_heads
    table_len = max_blocks * block_size
    device = q.device
    tile_len = TOKENS_PER_TILE

    # --- which request and which of its query tokens each tile holds -------------------------------------
    query_lens = query_lens.to(device=device, dtype=torch.int64).clamp(min=0)
    seq_lens = seq_lens.to(device=device, dtype=torch.int64)
    request_ends = torch.cumsum(query_lens, 0)  # one past each request's last token
    request_starts = request_ends - query_lens
    tiles_per_request = (query_lens + tile_len - 1) // tile_len
    tile_ends = torch.cumsum(tiles_per_request, 0)
    first_tiles = tile_ends - tiles_per_request
    # Enough for any split: each request adds at most one partly filled tile, and no tile is empty.
    num_tiles = min(-(-num_tokens // tile_len) + num_requests, num_tokens)
    tiles = torch.arange(num_tiles, device=device)
    # First request whose tiles end past the tile; padding requests (no tiles) end where the one before did, so
    # they are never chosen. Spare tiles past the batch's last fall on the last request; their rows are dropped.
    tile_request = torch.searchsorted(tile_ends, tiles, right=True).clamp_(max=num_requests - 1)
    query_index = (tiles - first_tiles[tile_request])[:, None] * tile_len + torch.arange(tile_len, device=device)
    # Each tile row's cache position: query j of a request sits at context_len + j.
    position = (seq_lens - query_lens)[tile_request][:, None] + query_index  # [tiles, tile_len]
    # Spare rows (past their request's last query) read some real row of q; what they compute is dropped.
    token_rows = (request_starts[tile_request][:, None] + query_index).clamp_(0, num_tokens - 1).view(-1)

    # --- where each token's result sits among the tiles' rows (a gather, so no write ever collides) --------
    tokens = torch.arange(num_tokens, device=device)
    token_request = torch.searchsorted(request_ends, tokens, right=True).clamp_(max=num_requests - 1)
    offset = tokens - request_starts[token_request]
    result_row = (first_tiles[token_request] + offset // tile_len) * tile_len + offset % tile_len
    # Padded tokens (past sum(query_lens)) read the zero row after the last tile's.
    result_row = torch.where(tokens < request_ends[-1], result_row, num_tiles * tile_len)

    tile_tables = block_tables.to(device=device, dtype=torch.int64)[tile_request]  # [tiles, max_blocks]
    tile_seq_lens = seq_lens[tile_request]
    key_positions = torch.arange(table_len, device=device)
    results = torch.empty(num_tiles * tile_len + 1, num_kv_heads, group, head_dim, dtype=torch.float32, device=device)
    results[-1].zero_()

    tiles_per_chunk = max(1, SCORES_PER_CHUNK // (tile_len * num_heads * table_len))
    for start in range(0, num_tiles, tiles_per_chunk):  # a loop over shapes, not over the batch's values
        stop = min(start + tiles_per_chunk, num_tiles)
        count = stop - start
        tables = tile_tables[start:stop].reshape(-1)
        # [count, kv_heads, table_len, head_dim]: each tile's request's keys in order of cache position.
        cached = (count, table_len, num_kv_heads, head_dim)
        keys = key_cache.index_select(0, tables).view(cached).transpose(1, 2).float()
        values = value_cache.index_select(0, tables).view(cached).transpose(1, 2).float()
        # Each KV head's group of query heads as rows of one matmul: [count, kv_heads, tile_len * group, head_dim].
        queries = (
            q.index_select(0, token_rows[start * tile_len : stop * tile_len]).float()
            .view(count, tile_len, num_kv_heads, group, head_dim).permute(0, 2, 1, 3, 4)
            .reshape(count, num_kv_heads, tile_len * group, head_dim)
        )
        scores = torch.matmul(queries, keys.transpose(-1, -2)).mul_(scale)
        # Causal from the context on. Each row sees key 0 at least (spare rows too: their position is >= 0 for
        # a valid batch), so no softmax is over nothing.
        visible = key_positions <= position[start:stop, :, None]  # [count, tile_len, table_len]
        scores.view(count, num_kv_heads, tile_len, group, table_len).masked_fill_(
            ~visible[:, None, :, None, :], float("-inf")
        )
        probs = torch.softmax(scores, dim=-1)
        # Slots past seq_len may never have been written (NaN in fresh memory), and a weight of 0 times NaN
        # is NaN: they are zeroed rather than trusted. (NaN keys there are already masked out of the scores.)
        values.masked_fill_((key_positions >= tile_seq_lens[start:stop, None])[:, None, :, None], 0.0)
        attended = torch.matmul(probs, values)  # [count, kv_heads, tile_len * group, head_dim]
        results[start * tile_len : stop * tile_len] = (
            attended.view(count, num_kv_heads, tile_len, group, head_dim).permute(0, 2, 1, 3, 4)
            .reshape(count * tile_len, num_kv_heads, group, head_dim)
        )
    out = results.index_select(0, result_row).view(num_tokens, num_heads, head_dim)
    return out.to(q.dtype)
