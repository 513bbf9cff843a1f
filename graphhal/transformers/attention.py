"""graphhal's attention inside a transformers model, swapped in by name through ``AttentionInterface``.

transformers decoders call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` in every layer with the
rotated queries, keys and values, and pass down every extra keyword argument the model was called with. The
step (``graphhal.transformers.steps``) calls the model with the batch's paged-cache inputs as such
keywords (``graphhal_*``); the attention registered here writes the layer's new keys and values into the
paged KV cache at ``graphhal_slot_mapping`` and attends over it with the reference model's attention ops:

- decode (no ``graphhal_query_lens``): one token per request, ``graphhal::decode_attention``;
- prefill (with ``graphhal_query_lens``): packed requests attending causally over their cached context,
  ``graphhal::prefill_attention``.

Both are called through their break points, so they are the splitting ops of piecewise and breakable graphs,
and their declared graph support (``hal.declare_graph_support``) decides what mode ``auto`` picks, exactly as
for the reference model. A name registered for attention and not for masks makes transformers skip building
an attention mask (``masking_utils``): the paged attention needs none, and building one reads the batch on the
host.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers

import hal
from graphhal.paged_attention.decode_attention_op import decode_attention_break
from graphhal.paged_attention.kv_cache import PagedKVCache, write_kv_cache_step
from graphhal.paged_attention.prefill_attention_op import prefill_attention_break

ATTENTION_NAME = "graphhal"

# Per-layer attention features the paged attention does not compute: the keyword transformers passes for
# each, and what it means. A layer asking for one gets an error naming it rather than a silently wrong result.
_UNSUPPORTED_KEYWORDS = {
    "softcap": "logit soft-capping (Gemma 2 style)",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
}


class UnsupportedModelError(hal.GraphHalError, ValueError):
    """A transformers model whose attention graphhal cannot take over; the message names what is missing."""


class MissingBatchError(hal.GraphHalError, RuntimeError):
    """graphhal's attention was called without the paged-cache inputs of a graphhal step."""


# The batch inputs a step hands every layer, besides the cache; prefill adds graphhal_query_lens.
_BATCH_KEYWORDS = ("graphhal_slot_mapping", "graphhal_block_tables", "graphhal_seq_lens")


def register_graphhal_attention() -> None:
    """Make ``"graphhal"`` a name transformers' ``AttentionInterface`` knows (idempotent)."""
    transformers.AttentionInterface.register(ATTENTION_NAME, graphhal_attention)


def graphhal_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """One layer's attention over the paged KV cache: query [1, heads, T, head_dim], key and value
    [1, kv_heads, T, head_dim] (rotated, not repeated over the query groups); returns [1, T, heads, head_dim].

    The batch is one row of ``T`` packed tokens, as the step calls the model: decode rows or prefill tokens.
    """
    missing = [name for name in ("graphhal_kv_cache", *_BATCH_KEYWORDS) if kwargs.get(name) is None]
    if missing:
        raise MissingBatchError(
            f"graphhal attention was called without {', '.join(missing)}: run the model through "
            "graphhal.transformers' steps (or a runner built by decode_runner/prefill_runner), or set another "
            "attn_implementation (model.set_attn_implementation('sdpa')) to call it directly"
        )
    kv_cache: PagedKVCache = kwargs["graphhal_kv_cache"]
    for keyword, feature in _UNSUPPORTED_KEYWORDS.items():
        if kwargs.get(keyword) is not None:
            raise UnsupportedModelError(f"{type(module).__name__} asks for {feature} ({keyword}=), which graphhal attention does not compute")
    if dropout:
        raise UnsupportedModelError(f"graphhal attention runs inference only; {type(module).__name__} asked for dropout {dropout}")
    layer = module.layer_idx
    key_cache, value_cache = kv_cache.key_caches[layer], kv_cache.value_caches[layer]
    # [1, heads, T, head_dim] -> [T, heads, head_dim]: the token-major layout of the cache and the kernels.
    q = query[0].transpose(0, 1).contiguous()
    write_kv_cache_step(key[0].transpose(0, 1), value[0].transpose(0, 1), key_cache, value_cache, kwargs["graphhal_slot_mapping"])
    out = torch.empty_like(q)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    query_lens = kwargs.get("graphhal_query_lens")
    if query_lens is None:
        decode_attention_break(q, key_cache, value_cache, kwargs["graphhal_block_tables"], kwargs["graphhal_seq_lens"], scale, out)
    else:
        prefill_attention_break(
            q, key_cache, value_cache, kwargs["graphhal_block_tables"], query_lens, kwargs["graphhal_seq_lens"], scale, out
        )
    return out.unsqueeze(0), None


def use_graphhal_attention(model: torch.nn.Module, max_seq_len: int) -> None:
    """Switch ``model`` to graphhal attention, or raise ``UnsupportedModelError`` naming what it lacks.

    The switch is the model's own setting (``config._attn_implementation``): afterwards the model computes
    attention only inside graphhal's steps; ``model.set_attn_implementation("sdpa")`` switches it back (for
    ``model.generate``, say), and calling this again switches it to graphhal before the runners run again.

    ``max_seq_len``: the longest sequence the KV cache serves; a sliding window shorter than it would need
    attention that forgets old tokens, which the paged attention does not do.
    """
    if not isinstance(model, transformers.PreTrainedModel):
        raise UnsupportedModelError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    name = type(model).__name__
    if not getattr(model, "_supports_attention_backend", False):
        raise UnsupportedModelError(
            f"{name} does not take its attention from transformers' AttentionInterface (its class does not set "
            "_supports_attention_backend), so graphhal cannot swap its attention for the paged one"
        )
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name} is an encoder-decoder model; graphhal runs decoder-only causal LMs")
    for feature in _unsupported_features(model):
        raise UnsupportedModelError(f"{name} uses {feature}, which graphhal's paged attention does not compute")
    window = _sliding_window(config)
    if window is not None and window < max_seq_len:
        raise UnsupportedModelError(
            f"{name} uses sliding-window attention over {window} tokens, and graphhal's paged attention attends to "
            f"the whole context: serve at most max_seq_len={window} tokens per request (asked for {max_seq_len})"
        )
    register_graphhal_attention()
    model.set_attn_implementation(ATTENTION_NAME)


def _unsupported_features(model: torch.nn.Module) -> list[str]:
    """What ``model``'s attention computes beyond plain causal softmax attention over one head dim."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    features = []
    if getattr(config, "attn_logit_softcapping", None) is not None:
        features.append(f"attention logit soft-capping (attn_logit_softcapping={config.attn_logit_softcapping})")
    if getattr(config, "kv_lora_rank", None) is not None:
        features.append("multi-head latent attention (kv_lora_rank: keys and values of another shape than the queries)")
    if any(isinstance(getattr(module, "sinks", None), torch.nn.Parameter) for module in model.modules()):
        features.append("attention sinks (learned per-head sink logits)")
    return features


def _sliding_window(config: Any) -> int | None:
    """The sliding window any layer of ``config`` uses, if one does."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None  # a window configured but used by no layer (Qwen2 without use_sliding_window)
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)
