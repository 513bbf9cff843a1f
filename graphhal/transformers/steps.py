"""A transformers causal LM as the decode and prefill steps a runner captures.

The runners pass each step its input slots as keyword tensors (the reference model's slots: one row per
decode request; one row per prefill token plus one per request). A step calls the model on one row of ``T``
packed tokens, with positions given explicitly (so no cache object, no attention mask), and hands the paged
cache's inputs down to every layer's attention as ``graphhal_*`` keywords
(``graphhal.transformers.attention``). It returns the logits of every token: [T, vocab].
"""

from __future__ import annotations

import torch

from graphhal.paged_attention.kv_cache import PagedKVCache


class _Step(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, kv_cache: PagedKVCache) -> None:
        super().__init__()
        self.model = model
        self.kv_cache = kv_cache

    def _logits(self, input_ids: torch.Tensor, positions: torch.Tensor, **cache_inputs: torch.Tensor) -> torch.Tensor:
        output = self.model(
            input_ids=input_ids.unsqueeze(0),
            position_ids=positions.unsqueeze(0),
            use_cache=False,
            graphhal_kv_cache=self.kv_cache,
            **{f"graphhal_{name}": tensor for name, tensor in cache_inputs.items()},
        )
        return output.logits[0]


class DecodeStep(_Step):
    """One new token per request: ``graphhal.paged_attention.decode_input_slots``."""

    def forward(
        self,
        *,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> torch.Tensor:
        return self._logits(input_ids, positions, seq_lens=seq_lens, block_tables=block_tables, slot_mapping=slot_mapping)


class PrefillStep(_Step):
    """Packed new tokens of several requests, each after its cached context: ``graphhal.paged_attention.prefill_token_slots``
    and ``graphhal.paged_attention.prefill_request_slots``."""

    def forward(
        self,
        *,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        query_lens: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
    ) -> torch.Tensor:
        return self._logits(
            input_ids, positions, slot_mapping=slot_mapping, query_lens=query_lens, seq_lens=seq_lens, block_tables=block_tables
        )
