"""Random K/V standing in for an already-prefilled context, the same for one seed on every device."""

from __future__ import annotations

import torch

from graphhal.paged_attention.kv_cache import PagedKVCache


def fill_random_context(kv_cache: PagedKVCache, slots: torch.Tensor, seed: int) -> None:
    """Write standard-normal keys and values at ``slots`` (int64, flat cache slots) in every layer.

    Values are drawn on the CPU from ``seed``, one layer at a time, like the model's weights: the cache then
    holds the same values on every device (a CPU and a CUDA run of one seed are comparable) without ever
    holding more than a layer's worth of random values at once. Slot ``k`` gets the ``k``-th draw, so two
    caches filled with the same seed and the same number of slots, in the same order, hold the same context.
    """
    if slots.numel() == 0:
        return
    config = kv_cache.config
    generator = torch.Generator().manual_seed(seed)
    shape = (slots.numel(), config.num_kv_heads, config.head_dim)
    slots = slots.to(kv_cache.device)
    for key_cache, value_cache in zip(kv_cache.key_caches, kv_cache.value_caches):
        for layer_cache in (key_cache, value_cache):
            values = torch.randn(shape, generator=generator).to(kv_cache.device, kv_cache.dtype)
            layer_cache.view(-1, *shape[1:]).index_copy_(0, slots, values)
