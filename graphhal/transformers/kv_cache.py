"""A paged KV cache sized from a transformers model's config: layers, KV heads, head dim and dtype.

It is the reference model's ``PagedKVCache`` (per-layer key and value tensors of
[num_blocks, block_size, kv_heads, head_dim], block 0 reserved for padding, a host-side block allocator), so
the attention ops and the runners' padding conventions are the reference model's too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from graphhal.refmodel.config import ModelConfig
from graphhal.paged_attention.kv_cache import PagedKVCache
from graphhal.transformers.layers import text_config
from graphhal.transformers.tensor_parallel import shard_of

DEFAULT_MAX_SEQ_LEN = 4096


def cache_shape(config: Any, *, block_size: int = 16, max_seq_len: int | None = None) -> ModelConfig:
    """The reference model's ``ModelConfig`` for the cache and input slots of a transformers decoder config.

    ``max_seq_len``: the longest request (prompt and generated tokens) the cache and block tables serve,
    rounded down to whole blocks; default the model's ``max_position_embeddings`` up to
    ``DEFAULT_MAX_SEQ_LEN`` (Llama 3 allows 131072 tokens: block tables that wide would be copied with every
    batch). Set it to what the server admits.
    """
    text = text_config(config)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    longest = max_seq_len if max_seq_len is not None else min(text.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
    longest -= longest % block_size
    if longest <= 0:
        raise ValueError(f"max_seq_len {max_seq_len or text.max_position_embeddings} holds no whole block of {block_size} tokens")
    return ModelConfig(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        num_layers=text.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        intermediate_size=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
        block_size=block_size,
        max_seq_len=longest,
    )


def paged_kv_cache(
    model: torch.nn.Module,
    num_blocks: int,
    *,
    block_size: int = 16,
    max_seq_len: int | None = None,
    dtype: torch.dtype | None = None,
) -> PagedKVCache:
    """A zeroed paged KV cache for every layer of ``model``, on its device and (by default) in its dtype.

    ``num_blocks`` counts the reserved padding block: ``num_blocks - 1`` blocks of ``block_size`` tokens
    serve requests. A model split by ``shard_model`` gets a cache of its rank's heads.
    """
    parameter = next(model.parameters())
    shape = cache_shape(model.config, block_size=block_size, max_seq_len=max_seq_len)
    shard = shard_of(model)
    if shard is not None:  # a tensor-parallel rank caches the heads its attention keeps
        shape = dataclasses.replace(shape, num_heads=shard.num_heads, num_kv_heads=shard.num_kv_heads)
    return PagedKVCache(shape, num_blocks, parameter.device, dtype or parameter.dtype)
