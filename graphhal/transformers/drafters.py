"""A ``graphhal.speculative.DraftModelDrafter`` for a transformers draft model (transformers' ``assistant_model``):
its own KV cache and runners, its graphs in the target's pool.

    drafter = draft_model_drafter(small_model, "cuda", like=kv_cache, pool=prefill.pool, mode="full")
    drafter.capture()                          # after the target's graphs of that pool
"""

from __future__ import annotations

from typing import Any

import torch

import hal
from graphhal.paged_attention.kv_cache import PagedKVCache
from graphhal.speculative.draft_model import DraftModelDrafter
from graphhal.transformers.builders import decode_runner, prefill_runner
from graphhal.transformers.kv_cache import paged_kv_cache
from runners import DecodeConfig, PrefillConfig


def draft_model_drafter(
    model: torch.nn.Module,
    device: "str | hal.Device",
    *,
    like: PagedKVCache,
    pool: Any = None,
    mode: str = "auto",
    max_bs: int | None = None,
    max_tokens: int | None = None,
    max_requests: int | None = None,
    **config_options: Any,
) -> DraftModelDrafter:
    """A drafter running ``model`` (the target's vocabulary) through a decode and a prefill runner of its own,
    uncaptured (``capture()`` it after the target's runners).

    like:       the target's KV cache: the draft cache gets as many blocks of the same size and the same longest
                request, and a request takes as many blocks in it as in the target's (``max_len - 1`` tokens),
                so every request the target admits has room in it.
    pool:       the target's graph pool (the draft graphs never replay while the target's run).
    mode, max_bs, max_tokens, max_requests, config_options: the runners' ``DecodeConfig`` and ``PrefillConfig``
                (``max_bs``: requests per draft decode step; ``max_tokens``, ``max_requests``: a first-draft
                step's packed tokens and requests; defaults: the configs').
    """
    kv_cache = paged_kv_cache(model, like.num_blocks, block_size=like.block_size, max_seq_len=like.config.max_blocks_per_seq * like.block_size)
    decode_options = {"max_bs": max_bs} if max_bs is not None else {}
    prefill_options = {name: value for name, value in (("max_tokens", max_tokens), ("max_requests", max_requests)) if value is not None}
    prefill = prefill_runner(model, kv_cache, device, PrefillConfig(mode=mode, **prefill_options, **config_options), pool=pool)
    decode = decode_runner(model, kv_cache, device, DecodeConfig(mode=mode, **decode_options, **config_options), pool=prefill.pool)
    return DraftModelDrafter(decode, prefill, kv_cache)
