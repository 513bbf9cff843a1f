"""A transformers causal LM as the decode and prefill steps a runner captures.

The runners pass each step its input slots as keyword tensors (the reference model's slots: one row per
decode request; one row per prefill token plus one per request). A step calls the model on one row of ``T``
packed tokens, with positions given explicitly (so no cache object, no attention mask), and hands the paged
cache's inputs down to every layer's attention as ``graphhal_*`` keywords
(``graphhal.transformers.attention``). It returns the logits of every token: [T, vocab].

A step run eagerly (mode ``disabled``, a batch over the largest bucket, and the runs before a capture) checks
that graphhal serves the whole model, as it was when the runner was built:

- before it calls the model, that the model is still set to graphhal's attention: after
  ``model.set_attn_implementation("sdpa")`` its layers would attend over the packed tokens without the cache
  (``AttentionSwitchedError``);
- after, that every decoder layer called graphhal's attention (``recording_attention_calls``): a layer that did
  not mixed its tokens some other way, which the static check of ``use_graphhal_attention`` did not see
  (``UnsupportedModelError``, naming the layers).

Both cost a set insert per layer and one comparison per step. A compiled step skips them while it is traced,
and a captured one replays without running Python.
"""

from __future__ import annotations

import torch

from graphhal.paged_attention.kv_cache import PagedKVCache
from graphhal.transformers import layers
from graphhal.transformers.attention import (
    UnsupportedModelError,
    check_attention_is_graphhal,
    recording_attention_calls,
)


class _Step(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, kv_cache: PagedKVCache) -> None:
        super().__init__()
        self.model = model
        self.kv_cache = kv_cache
        self.num_layers = layers.num_layers(model)

    def _logits(self, input_ids: torch.Tensor, positions: torch.Tensor, **cache_inputs: torch.Tensor | None) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._call_model(input_ids, positions, **cache_inputs)
        check_attention_is_graphhal(self.model)
        with recording_attention_calls() as called:
            logits = self._call_model(input_ids, positions, **cache_inputs)
        if len(called) < self.num_layers:
            self._refuse_layers_without_attention(called)
        return logits

    def _call_model(
        self, input_ids: torch.Tensor, positions: torch.Tensor, logits_rows: torch.Tensor | None = None, **cache_inputs: torch.Tensor
    ) -> torch.Tensor:
        # logits_rows: transformers' logits_to_keep (a tensor of positions), so the head runs on those rows only.
        rows = {} if logits_rows is None else {"logits_to_keep": logits_rows}
        output = self.model(
            input_ids=input_ids.unsqueeze(0),
            position_ids=positions.unsqueeze(0),
            use_cache=False,
            graphhal_kv_cache=self.kv_cache,
            **rows,
            **{f"graphhal_{name}": tensor for name, tensor in cache_inputs.items()},
        )
        return output.logits[0]

    def _refuse_layers_without_attention(self, called: set[int]) -> None:
        views = [view for view in layers.layer_views(self.model) if view.index not in called]
        for view in views:
            view.why.append("did not call graphhal's attention in this step")
        raise UnsupportedModelError(
            f"{type(self.model).__name__}: {len(views)} of its {self.num_layers} decoder layers computed this step "
            f"without graphhal's attention: {layers.describe_layers(views)}. Their tokens did not go through the paged "
            "KV cache and are wrong. graphhal serves only models whose every decoder layer takes its attention from "
            "transformers' AttentionInterface; serve this one with transformers' own generate()."
        )


class DecodeStep(_Step):
    """One new token per request (logits [requests, vocab]), or ``q`` per request for a speculative verify step
    (input_ids, positions, slot_mapping [requests, q]; logits [requests, q, vocab]):
    ``graphhal.paged_attention.decode_input_slots(..., query_tokens=q)``."""

    def forward(
        self,
        *,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> torch.Tensor:
        shape = input_ids.shape
        if input_ids.dim() == 2:  # the requests' tokens back to back, as the model sees one packed row
            input_ids, positions, slot_mapping = input_ids.reshape(-1), positions.reshape(-1), slot_mapping.reshape(-1)
        logits = self._logits(input_ids, positions, seq_lens=seq_lens, block_tables=block_tables, slot_mapping=slot_mapping)
        return logits.view(*shape, logits.shape[-1])


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


class PrefillRowsStep(_Step):
    """``PrefillStep`` computing logits only at the request slot ``logits_rows`` (one packed token row per
    request: its last token, for sampling), through transformers' ``logits_to_keep``; returns
    ``{"logits": [R, vocab]}``, one row per request (the runner's ``request_outputs``)."""

    def forward(
        self,
        *,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        query_lens: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
        logits_rows: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        logits = self._logits(
            input_ids, positions, logits_rows=logits_rows, slot_mapping=slot_mapping, query_lens=query_lens,
            seq_lens=seq_lens, block_tables=block_tables,
        )
        return {"logits": logits}
