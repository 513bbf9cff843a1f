"""Which KV-cache slots a step wrote: snapshots of a ``PagedKVCache`` and the slots that differ since."""

from __future__ import annotations

import torch

from graphhal.paged_attention import PagedKVCache


def cache_snapshot(cache: PagedKVCache) -> list[torch.Tensor]:
    return [t.clone() for t in cache.key_caches + cache.value_caches]


def changed_slots(cache: PagedKVCache, before: list[torch.Tensor]) -> set[int]:
    """Flat slot indices whose K or V changed in any layer."""
    changed = set()
    for now, then in zip(cache.key_caches + cache.value_caches, before):
        differs = (now != then).flatten(start_dim=2).any(dim=-1).flatten()
        changed |= set(differs.nonzero().flatten().tolist())
    return changed
