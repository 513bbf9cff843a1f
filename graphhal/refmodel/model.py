"""A Llama-style decoder with random, seeded weights: the model the runners are tested and benchmarked on.

Two steps share every layer's projections and MLP and differ only in their attention:
- decode: one new token per row, attending over that row's paged KV cache (``decode_forward``);
- prefill: a packed batch of several requests' new tokens, each attending causally over its request's cached
  context and the new tokens before it (``prefill_forward``).

Both are written to be captured as device graphs, or split around their attention:
- every input is a device tensor, and nothing read from the batch reaches the host outside the attention ops
  (no ``.item()``, no data-dependent shapes); shapes depend only on the batch's token (and request) count;
- a row's logits depend only on its own request's inputs and the cache, so padded rows cannot change live rows;
- the cache is written with ``graphhal::write_kv_cache`` at ``slot_mapping`` before attention reads it
  (eagerly, where nothing traces or records the call, its kernel runs directly: ``graphhal.paged_attention.direct_kernels``);
- both attentions (``graphhal::decode_attention``, ``graphhal::prefill_attention``) are optional break points:
  captured inline in full graphs where their kernels allow (each declares its ``hal.GraphSupport``), run
  eagerly between segments in breakable graphs and between pieces in piecewise ones.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

import hal
from graphhal.paged_attention.decode_attention_op import decode_attention_break
from graphhal.refmodel.config import ModelConfig
from graphhal.refmodel.decoder_layer import Attention, DecoderLayer
from graphhal.paged_attention.kv_cache import PagedKVCache
from graphhal.paged_attention.prefill_attention_op import prefill_attention_break
from graphhal.refmodel.rms_norm import RMSNorm
from graphhal.refmodel.rotary import RotaryEmbedding
from graphhal.refmodel.seeded_init import SeededInit
from graphhal.refmodel.tensor_parallel import TensorParallel, use_device_all_reduce


class LlamaDecoder(torch.nn.Module):
    """Embedding, ``num_layers`` decoder layers, final norm and LM head, with weights drawn from ``seed``.

    ``forward`` (decode) and ``prefill`` take the KV cache as an argument; ``decode_forward(kv_cache)`` and
    ``prefill_forward(kv_cache)`` bind one and return the callable a runner wants: keyword arguments exactly
    the step's input slots, logits out.
    """

    def __init__(
        self,
        config: ModelConfig,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        *,
        tp_group: Any = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.tp = TensorParallel.of(tp_group)
        # What this rank computes: its heads, its MLP slice. Its KV cache is built from it (its KV heads).
        self.local_config = config.tensor_parallel_shard(self.tp.size)
        self.device = torch.device(device)
        use_device_all_reduce(tp_group, self.device)  # before any capture, on every rank
        self.dtype = dtype
        init = SeededInit(seed, self.device, dtype)
        self.embed_tokens = init.normal(config.vocab_size, config.hidden_size, std=1.0)
        self.layers = torch.nn.ModuleList(
            DecoderLayer(config, self.local_config, init, self.tp) for _ in range(config.num_layers)
        )
        self.final_norm = RMSNorm(config.hidden_size, config.rms_eps, self.device, dtype)
        self.lm_head = init.normal(config.vocab_size, config.hidden_size, std=config.hidden_size**-0.5)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta, self.device)
        self.device = self.embed_tokens.device  # "cuda" resolved to "cuda:0", so device checks compare equal

    def forward(
        self,
        *,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_cache: PagedKVCache,
    ) -> torch.Tensor:
        """One decode step for ``batch`` rows; returns logits [batch, vocab_size] in the model's dtype.

        input_ids [batch] int64, positions [batch] int64 (where the new token sits, = cached tokens before
        it), seq_lens [batch] int32 (tokens attended to, new one included; 0 = padded row), block_tables
        [batch, max_blocks] int32, slot_mapping [batch] int64 (cache slot the new token's K/V go to).
        Writes each row's new K/V into ``kv_cache``.

        Several new tokens per row (a speculative verify step, ``decode_input_slots(..., query_tokens=q)``):
        input_ids, positions and slot_mapping are [batch, q], seq_lens count all q new tokens, token ``i``
        attends causally to the first ``seq_len - (q - 1 - i)``; returns logits [batch, q, vocab_size].
        """
        scale = self.config.head_dim**-0.5
        # A row per request either way; the layers see the requests' tokens back to back, [batch * q].
        shape = input_ids.shape
        multi_token = input_ids.dim() == 2
        if multi_token:
            input_ids, positions, slot_mapping = input_ids.reshape(-1), positions.reshape(-1), slot_mapping.reshape(-1)

        def attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, out: torch.Tensor) -> None:
            if multi_token:  # [batch * q, heads, head_dim] -> [batch, q, heads, head_dim]: the op's q > 1 form
                q, out = q.view(*shape, *q.shape[1:]), out.view(*shape, *out.shape[1:])
            decode_attention_break(q, key_cache, value_cache, block_tables, seq_lens, scale, out)

        logits = self._logits(input_ids, positions, slot_mapping, kv_cache, attention)
        return logits.view(*shape, logits.shape[-1]) if multi_token else logits

    def prefill(
        self,
        *,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        query_lens: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
        kv_cache: PagedKVCache,
        logits_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One prefill step over ``T`` packed tokens of up to ``R`` requests; returns logits [T, vocab_size], or
        with ``logits_rows`` ([R] int64: a row among the packed tokens per request) only those rows' logits
        [R, vocab_size]: the step's largest tensor shrinks from every token's to one per request.

        Token inputs, [T] int64 each: input_ids, positions (a token's place in its request: context_len + j
        for its j-th new token), slot_mapping (cache slot its K/V go to; ``NULL_SLOT`` for padded tokens).
        Request inputs: query_lens [R] int32 (new tokens, packed in request order; 0 = padding request),
        seq_lens [R] int32 (cached context + new tokens), block_tables [R, max_blocks] int32. Rows at or past
        ``sum(query_lens)`` are padded tokens: their logits are finite and meaningless. Writes every token's
        K/V into ``kv_cache``.
        """
        scale = self.config.head_dim**-0.5

        def attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, out: torch.Tensor) -> None:
            prefill_attention_break(q, key_cache, value_cache, block_tables, query_lens, seq_lens, scale, out)

        return self._logits(input_ids, positions, slot_mapping, kv_cache, attention, logits_rows)

    def decode_forward(self, kv_cache: PagedKVCache) -> "DecodeStep":
        """The decode step with ``kv_cache`` bound: call it as ``step(**batch)``."""
        return DecodeStep(self, kv_cache)

    def prefill_forward(self, kv_cache: PagedKVCache, *, logits_rows: bool = False) -> "PrefillStep":
        """The prefill step with ``kv_cache`` bound: call it as ``step(**batch)``. With ``logits_rows`` it takes
        the request slot ``logits_rows`` (``prefill_request_slots(..., logits_rows=True)``) and returns
        ``{"logits": [R, vocab]}``, one row per request (a runner's ``request_outputs=PREFILL_ROW_OUTPUTS``)."""
        return (PrefillRowsStep if logits_rows else PrefillStep)(self, kv_cache)

    def _logits(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_cache: PagedKVCache,
        attention: Attention,
        logits_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._layers(input_ids, positions, slot_mapping, kv_cache, attention, logits_rows)
        # One step: attention kernels that take lengths as host values (npu) read them once, not once per layer.
        with hal.step_host_values():
            return self._layers(input_ids, positions, slot_mapping, kv_cache, attention, logits_rows)

    def _layers(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_cache: PagedKVCache,
        attention: Attention,
        logits_rows: torch.Tensor | None,
    ) -> torch.Tensor:
        hidden = F.embedding(input_ids, self.embed_tokens)
        angles = self.rotary.angles(positions)  # every layer rotates at the same positions: gathered once
        for layer, key_cache, value_cache in zip(self.layers, kv_cache.key_caches, kv_cache.value_caches):
            hidden = layer(hidden, angles, slot_mapping, key_cache, value_cache, attention)
        if logits_rows is not None:  # before the norm and the head: both are per row
            hidden = hidden.index_select(0, logits_rows)
        return F.linear(self.final_norm(hidden), self.lm_head)


class _BoundStep(torch.nn.Module):
    """A decoder with a KV cache bound that was built for it (same config, device and dtype)."""

    def __init__(self, model: LlamaDecoder, kv_cache: PagedKVCache) -> None:
        super().__init__()
        if kv_cache.config != model.local_config:
            raise ValueError(
                "the KV cache was built for a different ModelConfig than the model"
                + (" (under tensor parallelism, build it from model.local_config: this rank's KV heads)" if model.tp.size > 1 else "")
            )
        if kv_cache.device != model.device or kv_cache.dtype != model.dtype:
            raise ValueError(
                f"the KV cache is {kv_cache.dtype} on {kv_cache.device}, the model {model.dtype} on {model.device}"
            )
        self.model = model
        self.kv_cache = kv_cache


class DecodeStep(_BoundStep):
    """A decoder with its KV cache bound, called with exactly the decode input slots as keywords.

    This is the forward callable to hand a runner (its inputs are ``graphhal.paged_attention.decode_input_slots``).
    """

    def forward(
        self,
        *,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> torch.Tensor:
        return self.model(
            input_ids=input_ids,
            positions=positions,
            seq_lens=seq_lens,
            block_tables=block_tables,
            slot_mapping=slot_mapping,
            kv_cache=self.kv_cache,
        )


class PrefillStep(_BoundStep):
    """A decoder with its KV cache bound, called with exactly the prefill input slots as keywords.

    Its inputs are ``graphhal.paged_attention.prefill_token_slots`` (one row per packed token) followed by
    ``graphhal.paged_attention.prefill_request_slots`` (one row per request); see ``LlamaDecoder.prefill``.
    """

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
        return self.model.prefill(
            input_ids=input_ids,
            positions=positions,
            slot_mapping=slot_mapping,
            query_lens=query_lens,
            seq_lens=seq_lens,
            block_tables=block_tables,
            kv_cache=self.kv_cache,
        )


class PrefillRowsStep(_BoundStep):
    """``PrefillStep`` that computes logits only at ``logits_rows`` (a request slot: each request's last
    token, say) and returns ``{"logits": [R, vocab]}``: at 2048 tokens and a 128k vocabulary the logits are
    about 0.5 GB of graph pool in bfloat16, and one row per request is what a sampler reads."""

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
        logits = self.model.prefill(
            input_ids=input_ids,
            positions=positions,
            slot_mapping=slot_mapping,
            query_lens=query_lens,
            seq_lens=seq_lens,
            block_tables=block_tables,
            kv_cache=self.kv_cache,
            logits_rows=logits_rows,
        )
        return {"logits": logits}
