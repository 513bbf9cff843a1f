"""graphhal's attention inside a transformers model, swapped in by name through ``AttentionInterface``.

transformers decoders call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` in every layer with the
rotated queries, keys and values, and pass down every extra keyword argument the model was called with. The
step (``graphhal.transformers.steps``) calls the model with the batch's paged-cache inputs as such
keywords (``graphhal_*``); the attention registered here writes the layer's new keys and values into the
paged KV cache at ``graphhal_slot_mapping`` and attends over it with the reference model's attention ops:

- decode (no ``graphhal_query_lens``): one token per request, or the same ``q`` tokens per request back to back
  (a speculative verify step: ``T = requests * q``), ``graphhal::decode_attention``;
- prefill (with ``graphhal_query_lens``): packed requests attending causally over their cached context,
  ``graphhal::prefill_attention``.

Both are called through their break points, so they are the splitting ops of piecewise and breakable graphs,
and their declared graph support (``hal.declare_graph_support``) decides what mode ``auto`` picks, exactly as
for the reference model. A name registered for attention and not for masks makes transformers skip building
an attention mask (``masking_utils``): the paged attention needs none, and building one reads the batch on the
host.

``use_graphhal_attention`` switches a model only when graphhal computes all of it right: every decoder layer
one it serves (``graphhal.transformers.layers``: not a convolution, state-space or linear-attention layer), no
attention feature the kernels lack (logit soft-capping, sinks, latent attention), no sliding window or chunk
shorter than the served length. The attention also records, in an eager step, which layers called it
(``recording_attention_calls``), for the step's own check (``graphhal.transformers.steps``).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import transformers

import hal
from graphhal.paged_attention.decode_attention_op import decode_attention_break
from graphhal.paged_attention.kv_cache import PagedKVCache, write_kv_cache_step
from graphhal.paged_attention.prefill_attention_op import prefill_attention_break
from graphhal.transformers import layers

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


class AttentionSwitchedError(hal.GraphHalError, RuntimeError):
    """A step ran a model whose attention is no longer graphhal's (``set_attn_implementation`` after the
    runners were built)."""


# The layers that called graphhal's attention in the eager step running on this thread (None: no step is
# recording). Only eager steps record: a compiled or captured step does not run this Python again.
_calls = threading.local()


@contextmanager
def recording_attention_calls() -> Iterator[set[int]]:
    """The set of layer indices whose attention called graphhal's inside this block (on this thread)."""
    called: set[int] = set()
    previous = getattr(_calls, "layers", None)
    _calls.layers = called
    try:
        yield called
    finally:
        _calls.layers = previous


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
    if not torch.compiler.is_compiling():  # a traced step records nothing (and Dynamo must not see the set)
        called = getattr(_calls, "layers", None)
        if called is not None:
            called.add(layer)
    key_cache, value_cache = kv_cache.key_caches[layer], kv_cache.value_caches[layer]
    # [1, heads, T, head_dim] -> [T, heads, head_dim]: the token-major layout of the cache and the kernels.
    q = query[0].transpose(0, 1).contiguous()
    write_kv_cache_step(key[0].transpose(0, 1), value[0].transpose(0, 1), key_cache, value_cache, kwargs["graphhal_slot_mapping"])
    out = torch.empty_like(q)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    query_lens = kwargs.get("graphhal_query_lens")
    if query_lens is None:
        seq_lens = kwargs["graphhal_seq_lens"]
        requests = seq_lens.shape[0]
        if q.shape[0] != requests:  # q > 1 new tokens per request (a verify step), back to back: the op's 4-D form
            q, out = (t.view(requests, t.shape[0] // requests, *t.shape[1:]) for t in (q, out))
        decode_attention_break(q, key_cache, value_cache, kwargs["graphhal_block_tables"], seq_lens, scale, out)
        out = out.view(-1, *out.shape[-2:])
    else:
        prefill_attention_break(
            q, key_cache, value_cache, kwargs["graphhal_block_tables"], query_lens, kwargs["graphhal_seq_lens"], scale, out
        )
    return out.unsqueeze(0), None


def use_graphhal_attention(model: torch.nn.Module, max_seq_len: int) -> None:
    """Switch ``model`` to graphhal attention, or raise ``UnsupportedModelError`` naming what it lacks.

    The switch is the model's own setting (``config._attn_implementation``): afterwards the model computes
    attention only inside graphhal's steps; ``model.set_attn_implementation("sdpa")`` switches it back (for
    ``model.generate``, say), and calling this again switches it to graphhal before the runners run again (a
    step run in between raises ``AttentionSwitchedError``).

    ``max_seq_len``: the longest sequence the KV cache serves; a sliding window or an attention chunk shorter
    than it would need attention that forgets old tokens, which the paged attention does not do.
    """
    if not isinstance(model, transformers.PreTrainedModel):
        raise UnsupportedModelError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    name = type(model).__name__
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name} is an encoder-decoder model; graphhal runs decoder-only causal LMs")
    refused = layers.refused_layers(model)
    if refused:  # before the class-wide check below: it names the layers that keep hybrids from being served
        raise UnsupportedModelError(unserved_layers_message(name, refused, layers.num_layers(model)))
    if not getattr(model, "_supports_attention_backend", False):
        raise UnsupportedModelError(
            f"{name} does not take its attention from transformers' AttentionInterface (its class does not set "
            "_supports_attention_backend), so graphhal cannot swap its attention for the paged one"
        )
    for feature in _unsupported_features(model):
        raise UnsupportedModelError(f"{name} uses {feature}, which graphhal's paged attention does not compute")
    window = _sliding_window(config)
    if window is not None and window < max_seq_len:
        raise UnsupportedModelError(
            f"{name} uses sliding-window attention over {window} tokens, and graphhal's paged attention attends to "
            f"the whole context: serve at most max_seq_len={window} tokens per request (asked for {max_seq_len})"
        )
    chunk = layers.chunk_size(config)
    if chunk is not None and chunk < max_seq_len:
        chunked = layers.chunked_layers(config)
        raise UnsupportedModelError(
            f"{name} uses chunked attention (attention_chunk_size={chunk}: a token attends only to the tokens of its "
            f"own {chunk}-token chunk) in layers {_indices(chunked)}, and graphhal's paged attention attends to the "
            f"whole context: serve at most max_seq_len={chunk} tokens per request (asked for {max_seq_len})"
        )
    register_graphhal_attention()
    model.set_attn_implementation(ATTENTION_NAME)


def unserved_layers_message(name: str, refused: list[layers.LayerView], total: int) -> str:
    return (
        f"{name} has {len(refused)} of its {total} decoder layers that graphhal does not serve: "
        f"{layers.describe_layers(refused)}. graphhal serves decoder layers whose only token mixing is attention "
        "taken from transformers' AttentionInterface, over the paged KV cache; a convolution, state-space or "
        "linear-attention layer keeps a state per request that graphhal's steps do not carry, and would compute "
        "wrong tokens. Serve this model with transformers' own generate(), or a server that implements its layers."
    )


def check_attention_is_graphhal(model: torch.nn.Module) -> None:
    """``AttentionSwitchedError`` unless ``model`` is still set to graphhal's attention: a cheap check a step makes
    before it runs the model eagerly."""
    current = getattr(model.config, "_attn_implementation", None)
    if current != ATTENTION_NAME:
        raise AttentionSwitchedError(
            f"{type(model).__name__}'s attention is {current!r}, not graphhal's: it was switched after the runners "
            f"were built (model.set_attn_implementation({current!r})?), and a step would attend without the paged KV "
            "cache, computing wrong tokens. Call graphhal.transformers.use_graphhal_attention(model, max_seq_len) "
            "again (or build the runners again) before running them."
        )


def _indices(values: list[int]) -> str:
    shown = ", ".join(str(v) for v in values[:8])
    return shown + (f" and {len(values) - 8} more" if len(values) > 8 else "")


def _unsupported_features(model: torch.nn.Module) -> list[str]:
    """What ``model``'s attention computes beyond plain causal softmax attention over one head dim."""
    config = layers.text_config(model.config)
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
