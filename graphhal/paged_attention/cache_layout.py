"""What a paged KV cache and its step inputs are sized from: the one shape the cache, the slots and a model share."""

from __future__ import annotations

from typing import Protocol


class CacheLayout(Protocol):
    """The sizes a paged KV cache needs, read off any model description that has them (the reference model's
    ``ModelConfig``; the transformers integration builds one from a Hugging Face config).

    num_layers, num_kv_heads, head_dim: one key and one value tensor per layer, per KV head, of head_dim.
    block_size:          tokens per cache page.
    max_blocks_per_seq:  block-table width: enough pages for the longest request served.
    """

    @property
    def num_layers(self) -> int: ...

    @property
    def num_kv_heads(self) -> int: ...

    @property
    def head_dim(self) -> int: ...

    @property
    def block_size(self) -> int: ...

    @property
    def max_blocks_per_seq(self) -> int: ...
