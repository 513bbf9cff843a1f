"""Which decoder layers of a transformers model graphhal serves, told before anything runs.

graphhal's steps carry one state per request between steps: the paged KV cache, which graphhal's attention
(``graphhal.transformers.attention``) reads and writes. A decoder layer is served when its only token mixing is
an attention module that takes its attention function from transformers' ``AttentionInterface`` (so graphhal's
replaces it) over full context, or a sliding window or chunk no shorter than the longest request. Any other
token mixer keeps a state of its own per request that no step carries: the short convolution of LFM2, the
state-space (Mamba) mixers of Jamba, Bamba, Zamba, Falcon-H1, Nemotron-H and granite-moe-hybrid, the linear
attention of MiniMax and Qwen3-Next, the recurrent blocks of RecurrentGemma. Run over a step's packed tokens
without that state, such a layer computes wrong tokens without any error, so a model with one is refused,
naming each layer (index and module class).

Two sources, each catching what the other cannot see:

- the config: ``layer_types`` (transformers' per-layer types: ``full_attention``, ``sliding_attention``,
  ``chunked_attention``, ``linear_attention``, ``conv``, ``hybrid``, ``mamba``...), and the older fields
  ``layers_block_type`` and ``hybrid_override_pattern``;
- the modules: the model's list of decoder layers, each searched for attention modules that dispatch through
  ``ALL_ATTENTION_FUNCTIONS`` and for stateful mixers (a ``Conv1d``, or a state-space ``A_log`` parameter).

A step checks the same thing at run time (``graphhal.transformers.steps``): every layer must have called
graphhal's attention.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

# The layer types whose token mixing graphhal's attention computes (chunked: when the chunk is long enough).
SERVED_LAYER_TYPES = ("full_attention", "sliding_attention")
CHUNKED = "chunked_attention"
# Older spellings of layer types, as transformers itself maps them (configuration_utils' legacy remap).
_LEGACY_NAMES = {"attention": "full_attention"}
# hybrid_override_pattern (Nemotron-H): one character per layer; "*" is attention.
_PATTERN_ATTENTION = "*"
# Parameters only state-space mixers have (Mamba, Mamba-2, gated delta nets): the log of the decay matrix.
_STATE_SPACE_PARAMETERS = ("A_log",)
_SHOWN = 6  # refused layers described one by one in a message; the rest are counted


@dataclass
class LayerView:
    """What graphhal sees in decoder layer ``index``."""

    index: int
    module: torch.nn.Module | None  # None when the model's list of decoder layers was not found
    layer_type: str | None  # from the config
    attention: list[torch.nn.Module] = field(default_factory=list)  # modules dispatching through the interface
    stateful: list[str] = field(default_factory=list)  # "name is Class" of the token mixers with a state of their own
    why: list[str] = field(default_factory=list)  # why graphhal does not serve it (refused_layers fills it)

    def describe(self) -> str:
        """``layer 1 (Lfm2DecoderLayer: conv is Lfm2ShortConv; layer type 'conv')``."""
        what = "; ".join(self.why)
        if self.module is not None:
            what = f"{type(self.module).__name__}: {what}" if what else type(self.module).__name__
        return f"layer {self.index} ({what})" if what else f"layer {self.index}"


def text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_layers(model: torch.nn.Module) -> int:
    return int(text_config(model.config).num_hidden_layers)


def layer_views(model: torch.nn.Module) -> list[LayerView]:
    """One ``LayerView`` per decoder layer of ``model``."""
    config = text_config(model.config)
    count = int(config.num_hidden_layers)
    types = config_layer_types(config, count)
    modules = decoder_layers(model)
    views = []
    for index in range(count):
        module = modules[index] if modules is not None else None
        view = LayerView(index, module, types[index] if types is not None else None)
        if module is not None:
            view.attention = [m for m in module.modules() if takes_attention_from_interface(m)]
            view.stateful = _stateful_mixers(module)
        views.append(view)
    return views


def config_layer_types(config: Any, count: int) -> list[str] | None:
    """The type of each of ``count`` layers as the config states it, or None when it states none."""
    for name in ("layer_types", "layers_block_type"):
        types = getattr(config, name, None)
        if isinstance(types, (list, tuple)) and len(types) == count and all(isinstance(t, str) for t in types):
            return [_LEGACY_NAMES.get(t, t) for t in types]
    pattern = getattr(config, "hybrid_override_pattern", None)
    if isinstance(pattern, str) and len(pattern) == count:
        return ["full_attention" if char == _PATTERN_ATTENTION else f"{char!r} in hybrid_override_pattern" for char in pattern]
    return None


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's list of decoder layers: a ``ModuleList`` with one entry per hidden layer (the one named
    ``...layers`` if there are several), or None."""
    count = num_layers(model)
    lists = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.ModuleList) and len(module) == count]
    if not lists:
        return None
    named_layers = [module for name, module in lists if name.split(".")[-1] in ("layers", "h", "blocks")]
    return (named_layers or [module for _, module in lists])[0]


def takes_attention_from_interface(module: torch.nn.Module) -> bool:
    """Whether ``module``'s forward looks its attention function up in ``ALL_ATTENTION_FUNCTIONS``, the
    registry graphhal's attention is registered in (transformers' own test for a swappable attention)."""
    return "ALL_ATTENTION_FUNCTIONS" in _forward_names(type(module))


def refused_layers(model: torch.nn.Module) -> list[LayerView]:
    """The decoder layers of ``model`` that graphhal does not serve, each with ``why`` (module docstring)."""
    refused = []
    for view in layer_views(model):
        if view.stateful:
            view.why.append(", ".join(view.stateful))
        if view.module is not None and not view.attention:
            others = "" if view.stateful else _other_children(view.module)
            view.why.append((f"{others}, " if others else "") + "no attention from transformers' AttentionInterface")
        misplaced = [getattr(m, "layer_idx", None) for m in view.attention if getattr(m, "layer_idx", None) != view.index]
        if misplaced:
            view.why.append(f"its attention has layer_idx {misplaced[0]}, and the KV cache keeps one entry per layer index")
        # Chunked layers are checked with their chunk (use_graphhal_attention), as sliding windows are.
        if view.layer_type is not None and view.layer_type not in (*SERVED_LAYER_TYPES, CHUNKED):
            view.why.append(f"layer type {view.layer_type!r}")
        if view.why:
            refused.append(view)
    return refused


def describe_layers(views: list[LayerView]) -> str:
    shown = "; ".join(view.describe() for view in views[:_SHOWN])
    more = len(views) - _SHOWN
    return shown + (f"; and {more} more ({', '.join(str(v.index) for v in views[_SHOWN:])})" if more > 0 else "")


def chunk_size(config: Any) -> int | None:
    """The chunk of chunked attention (Llama 4's ``attention_chunk_size``) if any layer uses it."""
    config = text_config(config)
    chunk = getattr(config, "attention_chunk_size", None)
    if chunk is None:
        return None
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and CHUNKED not in types:
        return None  # configured, used by no layer
    return int(chunk)


def chunked_layers(config: Any) -> list[int]:
    config = text_config(config)
    types = getattr(config, "layer_types", None)
    if not isinstance(types, (list, tuple)):
        return list(range(int(config.num_hidden_layers)))
    return [index for index, layer_type in enumerate(types) if layer_type == CHUNKED]


def _stateful_mixers(layer: torch.nn.Module) -> list[str]:
    """The direct children of ``layer`` (outside its attention) that keep a state across tokens: a
    convolution over the sequence, or a state-space mixer."""
    found = []
    for name, child in layer.named_children():
        if takes_attention_from_interface(child):
            continue
        conv = any(isinstance(m, torch.nn.Conv1d) for m in child.modules())
        state_space = any(p.split(".")[-1] in _STATE_SPACE_PARAMETERS for p, _ in child.named_parameters())
        if conv or state_space:
            found.append(f"{name} is {type(child).__name__}")
    return found


def _other_children(layer: torch.nn.Module) -> str:
    """The children of a layer without attention that may mix tokens (not norms, not feed-forward blocks)."""
    names = [
        f"{name} is {type(child).__name__}"
        for name, child in layer.named_children()
        if not any(word in type(child).__name__.lower() for word in ("norm", "mlp", "moe", "feedforward", "expert"))
    ]
    return ", ".join(names)


_FORWARD_NAMES: dict[type, frozenset[str]] = {}


def _forward_names(cls: type) -> frozenset[str]:
    """The global names ``cls.forward`` reads (through decorators), cached per class."""
    if cls not in _FORWARD_NAMES:
        forward = inspect.unwrap(getattr(cls, "forward", None) or (lambda: None))
        code = getattr(forward, "__code__", None)
        _FORWARD_NAMES[cls] = frozenset(code.co_names) if code is not None else frozenset()
    return _FORWARD_NAMES[cls]
