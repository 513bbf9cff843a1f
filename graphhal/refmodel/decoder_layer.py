"""One layer of the reference decoder: attention (whichever the step binds) then a SwiGLU MLP."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from graphhal.paged_attention.kv_cache import write_kv_cache_step
from graphhal.refmodel.config import ModelConfig
from graphhal.refmodel.rms_norm import RMSNorm
from graphhal.refmodel.rotary import RotaryEmbedding
from graphhal.refmodel.seeded_init import SeededInit
from graphhal.refmodel.tensor_parallel import TensorParallel


class DecoderLayer(torch.nn.Module):
    """Pre-norm attention block then pre-norm SwiGLU MLP block, each added to the residual stream.

    Under tensor parallelism (``tp``) the layer holds its rank's heads and MLP slice (``local``: the shapes
    this rank computes) and sums the row-parallel projections' partial outputs with an all-reduce.
    """

    def __init__(self, config: ModelConfig, local: ModelConfig, init: SeededInit, tp: TensorParallel) -> None:
        super().__init__()
        self.config = local
        self.tp = tp
        hidden, inter = config.hidden_size, config.intermediate_size
        q_size = config.num_heads * config.head_dim
        kv_size = config.num_kv_heads * config.head_dim
        self.q_size, self.kv_size = local.num_heads * local.head_dim, local.num_kv_heads * local.head_dim
        # Fan-in scaled weights keep each projection's output near unit variance; the two projections that
        # feed the residual stream are further shrunk by sqrt(2 * layers), so the stream's variance grows
        # only to about 2x over the whole stack and bf16 never overflows.
        residual_shrink = 1.0 / math.sqrt(2 * config.num_layers)
        self.input_norm = RMSNorm(hidden, config.rms_eps, init.device, init.dtype)
        self.qkv_proj = init.normal(
            q_size + 2 * kv_size, hidden, std=hidden**-0.5, shard=lambda w: tp.rows(w, q_size, kv_size, kv_size)
        )
        self.o_proj = init.normal(hidden, q_size, std=q_size**-0.5 * residual_shrink, shard=tp.columns)
        self.post_attention_norm = RMSNorm(hidden, config.rms_eps, init.device, init.dtype)
        self.gate_up_proj = init.normal(2 * inter, hidden, std=hidden**-0.5, shard=lambda w: tp.rows(w, inter, inter))
        self.down_proj = init.normal(hidden, inter, std=inter**-0.5 * residual_shrink, shard=tp.columns)

    def forward(
        self,
        hidden: torch.Tensor,
        angles: tuple[torch.Tensor, torch.Tensor],
        slot_mapping: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        attention: "Attention",
    ) -> torch.Tensor:
        """One layer over ``tokens`` rows: hidden [tokens, hidden_size], slot_mapping [tokens].

        ``angles`` is ``RotaryEmbedding.angles`` at the rows' positions, gathered once per step for every
        layer. ``attention`` is the step's attention (decode or prefill) with that step's lengths and block
        tables bound; everything else is the same for both steps.
        """
        tokens = hidden.shape[0]
        cfg = self.config

        qkv = F.linear(self.input_norm(hidden), self.qkv_proj)
        # Queries and keys sit side by side in each row of qkv: rotated as one [tokens, heads + kv_heads,
        # head_dim] block, elementwise, so each comes out exactly as rotating it alone would give.
        qk = qkv[:, : self.q_size + self.kv_size].reshape(tokens, cfg.num_heads + cfg.num_kv_heads, cfg.head_dim)
        q, k = RotaryEmbedding.rotate(qk, *angles).split_with_sizes([cfg.num_heads, cfg.num_kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size :].reshape(tokens, cfg.num_kv_heads, cfg.head_dim)

        # The new tokens' K/V go into the cache first: a token attends to itself (the lengths count it).
        write_kv_cache_step(k, v, key_cache, value_cache, slot_mapping)
        attn = q.new_empty(q.shape)  # contiguous (q is a view into the rotated block)
        attention(q, key_cache, value_cache, attn)
        hidden = hidden + self.tp.all_reduce(F.linear(attn.reshape(tokens, self.q_size), self.o_proj))

        gate, up = F.linear(self.post_attention_norm(hidden), self.gate_up_proj).chunk(2, dim=-1)
        return hidden + self.tp.all_reduce(F.linear(F.silu(gate) * up, self.down_proj))


# What a layer calls to attend: (q, key_cache, value_cache, out) -> None, writing attention of q [tokens,
# num_heads, head_dim] over one layer's cache into out. The step builds it with its lengths and block tables
# bound, so the layer never sees which phase it is in.
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
