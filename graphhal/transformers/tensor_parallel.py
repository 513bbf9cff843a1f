"""A transformers model split over a tensor-parallel group by its own plan (``config.base_model_tp_plan``).

Every rank loads the same full model (the same checkpoint, or random weights from the same seed), then
``shard_model(model, group)`` keeps this rank's slice of each linear layer the plan names, in place. It is the
plan vLLM's Transformers backend applies, applied by graphhal so that the collectives are graphhal's: the
all-reduce after a row-parallel layer is the custom op ``refmodel::all_reduce`` (one node under
torch.compile, held by a captured graph, re-issued by the cpu device's recorded graphs), not transformers'
DTensor path, whose host-side bookkeeping a graph cannot hold.

What each style of the plan becomes (a Linear's weight is [out_features, in_features]):

    colwise                      rows (and bias) sliced: this rank computes its heads / its MLP slice
    rowwise                      columns sliced, the outputs all-reduced, the bias added once after the sum
    colwise_gather_output        kept whole (replicated): the output every rank needs is then computed on
                                 each, where transformers would compute a slice and gather it (OLMo 2's q/k/v,
                                 normalised over every head; Phi-3's fused projections)
    rowwise_split_input          columns sliced, applied to this rank's slice of a whole input, all-reduced
    replicated_with_grad_allreduce, replicate   nothing to do at inference (Qwen3's q/k norms)

The embedding and the LM head stay whole on every rank (their entries in ``_tp_plan`` are not applied): each
rank then samples the same token from the same logits, with no gather in the step. Experts (MoE) are not in
the tensor-parallel plan (transformers puts them in an expert-parallel plan) and stay whole: correct, with no
saving on them. A style not listed is refused by name before any weight changes.

Heads: a colwise q/k/v split leaves each rank ``heads / size`` query and KV heads; transformers' attention
reshapes by ``head_dim`` (``view(..., -1, head_dim)``), so the modules need no other change, and
``paged_kv_cache`` sizes the rank's cache from ``shard_of(model)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from graphhal.refmodel.tensor_parallel import TensorParallel, use_device_all_reduce
from graphhal.transformers.attention import UnsupportedModelError
from graphhal.transformers.layers import text_config

SLICED_BY_ROWS = "colwise"
SLICED_BY_COLUMNS = ("rowwise", "rowwise_split_input")
KEPT_WHOLE = ("colwise_gather_output", "replicated_with_grad_allreduce", "replicate")
SERVED_STYLES = (SLICED_BY_ROWS, *SLICED_BY_COLUMNS, *KEPT_WHOLE)

_SHARD_ATTRIBUTE = "_graphhal_tensor_parallel"


@dataclass(frozen=True)
class ModelShard:
    """What ``shard_model`` did to a model: its rank's place, and how many heads its attention keeps."""

    tp: TensorParallel
    num_heads: int  # query heads of this rank's attention
    num_kv_heads: int  # KV heads of this rank's attention (and KV cache)
    sliced: tuple[str, ...]  # the modules whose weights were sliced, in the model's order


class RowParallelLinear(torch.nn.Module):
    """A Linear's columns for this rank: the partial products summed over the group, the bias added once.

    split_input: the input is whole on every rank (it came from a layer kept whole), so this rank takes its
                 slice of the input's last dimension first (``rowwise_split_input``).
    """

    def __init__(self, linear: torch.nn.Linear, tp: TensorParallel, split_input: bool) -> None:
        super().__init__()
        self.tp, self.split_input = tp, split_input
        self.in_features, self.out_features = linear.in_features // tp.size, linear.out_features
        self.weight = torch.nn.Parameter(tp.columns(linear.weight.detach()), requires_grad=False)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.split_input:
            hidden = hidden.narrow(-1, self.tp.rank * self.in_features, self.in_features)
        summed = self.tp.all_reduce(F.linear(hidden, self.weight))
        return summed if self.bias is None else summed + self.bias


def shard_model(model: torch.nn.Module, group: Any) -> ModelShard:
    """Keep this rank's slice of every linear layer ``model``'s tensor-parallel plan names, in place, and
    return what was done (also ``shard_of(model)``). A group of one rank (or None) leaves the model whole.
    ``group`` is a ``torch.distributed`` process group, or a ``TensorParallel`` place (one without a group
    slices the weights, to inspect them; its all-reduce needs the group).

    Raises ``UnsupportedModelError`` naming the module before any weight changes when the plan asks for a
    style graphhal does not serve, slices what is not a Linear, splits heads other than through q/k/v_proj or
    unevenly over the group's ranks, or splits nothing; ``ValueError`` when the model was sharded already.
    """
    if getattr(model, _SHARD_ATTRIBUTE, None) is not None:
        raise ValueError("shard_model: this model is sharded already (shard_of(model) says how)")
    tp = group if isinstance(group, TensorParallel) else TensorParallel.of(group)
    text = text_config(model.config)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if tp.size == 1:  # nothing to split, and nothing in the plan to refuse
        shard = ModelShard(tp, heads, kv_heads, ())
        setattr(model, _SHARD_ATTRIBUTE, shard)
        return shard
    model_name = type(model).__name__
    plan = dict(getattr(text, "base_model_tp_plan", None) or {})
    if not plan:
        raise UnsupportedModelError(
            f"{model_name} has no tensor-parallel plan (config.base_model_tp_plan is empty): graphhal splits "
            "a transformers model only by its own plan; run it at TP=1"
        )
    base = getattr(model, model.base_model_prefix, model)
    chosen = _match_plan(base, plan, model_name)
    splits_heads = any(leaf(name) in ("k_proj", "v_proj") and style == SLICED_BY_ROWS for name, (_, style) in chosen.items())
    _check_even(chosen, tp.size, model_name, heads if splits_heads else None, kv_heads if splits_heads else None)
    sliced = []
    for name, (module, style) in chosen.items():
        if style == SLICED_BY_ROWS:
            _slice_rows(module, tp)
        elif style in SLICED_BY_COLUMNS:
            parent, _, child = name.rpartition(".")
            base.get_submodule(parent).register_module(child, RowParallelLinear(module, tp, style == "rowwise_split_input"))
        else:
            continue
        sliced.append(name)
    if tp.group is not None:
        use_device_all_reduce(tp.group, next(model.parameters()).device)  # before any capture, on every rank
    divide = tp.size if splits_heads else 1
    shard = ModelShard(tp, heads // divide, kv_heads // divide, tuple(sliced))
    setattr(model, _SHARD_ATTRIBUTE, shard)
    return shard


def shard_of(model: torch.nn.Module) -> ModelShard | None:
    """How ``shard_model`` split ``model`` (None: it did not)."""
    return getattr(model, _SHARD_ATTRIBUTE, None)


def leaf(module_name: str) -> str:
    return module_name.rpartition(".")[2]


def plan_key(name: str) -> str:
    """The plan's key for a module or parameter name, as transformers looks it up: layer numbers become ``*``
    (``layers.3.mlp.up_proj`` -> ``layers.*.mlp.up_proj``), nothing else is a wildcard."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def _match_plan(base: torch.nn.Module, plan: dict[str, str], model_name: str) -> dict[str, tuple[torch.nn.Module, str]]:
    """Every module of ``base`` the plan names (``layers.*.mlp.up_proj``), with its style; refused here, before
    anything changes, when a style is not served, a sliced module is not a Linear, the plan names a parameter
    rather than a module (per-head ``sinks``: graphhal slices modules), a head-splitting layer of attention is
    not q/k/v_proj (fused or low-rank projections: the cache's head count would be wrong), or nothing matches
    (a vision-language model's text plan under another prefix: nothing would be split)."""
    chosen: dict[str, tuple[torch.nn.Module, str]] = {}
    for name, module in base.named_modules():
        style = plan.get(plan_key(name))
        if style is None:
            continue
        where = f"{model_name}'s tensor-parallel plan asks {name} for style {style!r}"
        if style not in SERVED_STYLES:
            raise UnsupportedModelError(f"{where}, which graphhal does not serve; served: {', '.join(SERVED_STYLES)}")
        if style not in KEPT_WHOLE and not isinstance(module, torch.nn.Linear):
            raise UnsupportedModelError(f"{where}: a {type(module).__name__}; graphhal slices torch.nn.Linear layers only")
        if style == SLICED_BY_ROWS and ("attn" in name or "attention" in name) and leaf(name) not in ("q_proj", "k_proj", "v_proj"):
            raise UnsupportedModelError(f"{where}: graphhal splits attention heads only through q_proj, k_proj and v_proj")
        chosen[name] = (module, style)
    for name, _ in base.named_parameters():
        style = plan.get(plan_key(name))
        if style is not None and style not in KEPT_WHOLE:
            raise UnsupportedModelError(
                f"{model_name}'s tensor-parallel plan slices the parameter {name} ({style}); graphhal slices modules only"
            )
    if not any(style not in KEPT_WHOLE for _, style in chosen.values()):
        raise UnsupportedModelError(
            f"{model_name}'s tensor-parallel plan ({', '.join(sorted(plan))}) splits no module of its base model "
            f"{type(base).__name__}: nothing would be split"
        )
    return chosen


def _check_even(chosen: dict[str, tuple[torch.nn.Module, str]], size: int, model_name: str, heads: int | None, kv_heads: int | None) -> None:
    for count, what in ((heads, "attention heads"), (kv_heads, "KV heads")):
        if count is not None and count % size:
            raise UnsupportedModelError(f"{model_name} has {count} {what}, which {size} ranks cannot split evenly; use a TP size that divides it")
    for name, (module, style) in chosen.items():
        width = module.out_features if style == SLICED_BY_ROWS else module.in_features if style in SLICED_BY_COLUMNS else None
        if width is not None and width % size:
            raise UnsupportedModelError(f"{model_name}: {name} ({style}) is {width} wide, which {size} ranks cannot split evenly")


def _slice_rows(linear: torch.nn.Linear, tp: TensorParallel) -> None:
    linear.weight = torch.nn.Parameter(tp.rows(linear.weight.detach(), linear.out_features), requires_grad=False)
    if linear.bias is not None:
        linear.bias = torch.nn.Parameter(tp.rows(linear.bias.detach(), linear.out_features), requires_grad=False)
    linear.out_features //= tp.size
