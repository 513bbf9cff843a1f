"""transformers models split over two ranks by their own plan (``base_model_tp_plan``): greedy output equal to
the same model at TP=1, in every mode, with prefill and decode compiled by Inductor too (on CUDA: the cpu
device cannot record Inductor's kernels).

Each case spawns two ranks (``support.spawn_ranks``): cpu processes over gloo in CI, two GPUs over NCCL where a
machine has them. Every rank builds the same seeded model, generates at TP=1 on its own (the reference), then
splits a second copy with ``shard_model`` and generates with both ranks in lockstep.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from graphhal.refmodel.tensor_parallel import TensorParallel
from support.spawn_ranks import run_on_ranks

transformers = pytest.importorskip("transformers")

from graphhal.transformers import UnsupportedModelError, paged_kv_cache, shard_model, shard_of  # noqa: E402
from support.transformers_models import build_model, generate_through_graphhal, prompts  # noqa: E402

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.cpu, id="cpu-gloo"),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.gpus(2)], id="cuda-nccl"),
]
TEXTS = prompts((5, 11, 3))
NEW_TOKENS = 6


def split_generation_equals_tp1(rank: int, world_size: int, device_type: str, family: str, cases: list[tuple[str, str | None]]) -> dict:
    device = f"cuda:{rank}" if device_type == "cuda" else "cpu"
    reference = generate_through_graphhal(build_model(family, device), device, TEXTS, NEW_TOKENS, "disabled")
    model = build_model(family, device)
    shard = shard_model(model, dist.group.WORLD)
    outcome = {"shard": (shard.num_heads, shard.num_kv_heads, len(shard.sliced)), "kv_heads": paged_kv_cache(model, 4).config.num_kv_heads}
    for mode, compiler in cases:
        generated = generate_through_graphhal(model, device, TEXTS, NEW_TOKENS, mode, compiler, group=dist.group.WORLD)
        outcome[f"{mode}/{compiler}"] = generated == reference
    return outcome


def _run(device_type: str, family: str, cases: list[tuple[str, str | None]]) -> list[dict]:
    backend = "nccl" if device_type == "cuda" else "gloo"
    return run_on_ranks(split_generation_equals_tp1, device_type, family, cases, backend=backend, timeout_s=420)


@pytest.mark.parametrize("device_type", DEVICES)
def test_a_llama_split_over_two_ranks_generates_what_it_generates_whole_in_every_mode(device_type):
    from support.transformers_models import dynamo_reads_code_objects

    cases = [("disabled", None), ("full", None), ("breakable", None)]
    if dynamo_reads_code_objects():  # piecewise compiles the model's forward
        cases.append(("piecewise", None))
        if device_type == "cuda":  # the cpu device cannot record Inductor's C++ kernels (UnsupportedModeError)
            cases += [("full", "inductor"), ("piecewise", "inductor")]
    results = _run(device_type, "llama", cases)
    for rank, outcome in enumerate(results):
        # 4 query heads over 2 KV heads, halved; q/k/v/o and gate/up/down of both layers sliced.
        assert outcome.pop("shard") == (2, 1, 14) and outcome.pop("kv_heads") == 1, rank
        assert outcome == {f"{mode}/{compiler}": True for mode, compiler in cases}, rank


@pytest.mark.parametrize("device_type", DEVICES)
@pytest.mark.parametrize(
    "family, heads, sliced",
    [
        ("qwen2", (2, 1), 14),  # biases on q/k/v: sliced with their rows
        ("qwen3", (2, 1), 14),  # q/k norms per head: kept whole
        ("olmo2", (4, 2), 8),  # q/k/v kept whole (normalised over every head), o_proj splits its input
        ("phi3", (4, 2), 4),  # fused qkv and gate_up kept whole, o and down split their inputs
        ("mixtral", (2, 1), 8),  # experts stay whole on every rank: attention alone is split
    ],
)
def test_each_plan_style_splits_a_family_that_then_generates_what_it_generates_whole(device_type, family, heads, sliced):
    for rank, outcome in enumerate(_run(device_type, family, [("full", None)])):
        assert outcome == {"shard": (*heads, sliced), "kv_heads": heads[1], "full/None": True}, rank


# --- refused before any weight changes (one process: a rank's place is all the checks read) ---------------


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter.clone() for name, parameter in model.named_parameters()}


def _unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = dict(model.named_parameters())
    return after.keys() == before.keys() and all(torch.equal(after[name], before[name]) for name in before)


@pytest.mark.cpu
def test_heads_that_the_ranks_cannot_split_evenly_are_refused_naming_the_count():
    model = build_model("llama")  # 4 query heads over 2 KV heads
    before = _weights(model)
    with pytest.raises(UnsupportedModelError, match="4 attention heads, which 3 ranks cannot split evenly"):
        shard_model(model, TensorParallel(rank=0, size=3))
    assert _unchanged(model, before) and shard_of(model) is None


@pytest.mark.cpu
def test_a_plan_style_graphhal_does_not_serve_is_refused_naming_module_and_style():
    model = build_model("llama")
    model.config.base_model_tp_plan = {**model.config.base_model_tp_plan, "layers.*.mlp.down_proj": "sequence_parallel"}
    before = _weights(model)
    with pytest.raises(UnsupportedModelError, match=r"layers\.0\.mlp\.down_proj for style 'sequence_parallel'.*served: colwise"):
        shard_model(model, TensorParallel(rank=1, size=2))
    assert _unchanged(model, before)


@pytest.mark.cpu
def test_a_plan_that_slices_a_parameter_fused_heads_or_nothing_is_refused_before_any_change():
    cases = {
        "layers.*.self_attn.sinks": ("colwise", "slices the parameter layers.0.self_attn.sinks"),  # per-head, gpt-oss-like
        "layers.*.self_attn.qkv_proj": ("colwise", "splits attention heads only through q_proj"),  # fused heads
    }
    for key, (style, message) in cases.items():
        model = build_model("llama")
        attention = model.model.layers[0].self_attn
        if key.endswith("sinks"):
            attention.sinks = torch.nn.Parameter(torch.zeros(4))
        else:
            attention.qkv_proj = torch.nn.Linear(128, 256, bias=False)
        model.config.base_model_tp_plan = {**model.config.base_model_tp_plan, key: style}
        before = _weights(model)
        with pytest.raises(UnsupportedModelError, match=message):
            shard_model(model, TensorParallel(rank=0, size=2))
        assert _unchanged(model, before)
    elsewhere = build_model("llama")  # a text plan whose keys match nothing under this prefix
    elsewhere.config.base_model_tp_plan = {f"language_model.{key}": style for key, style in elsewhere.config.base_model_tp_plan.items()}
    with pytest.raises(UnsupportedModelError, match="splits no module of its base model"):
        shard_model(elsewhere, TensorParallel(rank=0, size=2))


@pytest.mark.cpu
def test_a_layer_number_is_the_only_wildcard_of_a_plan_key():
    from graphhal.transformers.tensor_parallel import plan_key

    assert plan_key("layers.12.mlp.up_proj") == "layers.*.mlp.up_proj"
    assert plan_key("layers.0.block.3.self_attn.q_proj") == "layers.*.block.*.self_attn.q_proj"
    assert plan_key("layers.x.self_attn.q_proj") == "layers.x.self_attn.q_proj"  # a * in a plan is not a glob


@pytest.mark.cpu
def test_a_model_without_a_plan_is_refused_and_one_rank_leaves_it_whole():
    model = build_model("llama")
    before = _weights(model)
    shard = shard_model(model, None)
    assert shard.sliced == () and (shard.num_heads, shard.num_kv_heads) == (4, 2) and _unchanged(model, before)
    with pytest.raises(ValueError, match="sharded already"):
        shard_model(model, None)
    unserved = build_model("llama")  # one rank: nothing to split, so nothing in the plan is refused
    unserved.config.base_model_tp_plan = {"layers.*.mlp.down_proj": "sequence_parallel"}
    assert shard_model(unserved, None).sliced == ()
    planless = build_model("llama")
    planless.config.base_model_tp_plan = None
    with pytest.raises(UnsupportedModelError, match="no tensor-parallel plan"):
        shard_model(planless, TensorParallel(rank=0, size=2))


@pytest.mark.cpu
def test_a_rank_keeps_its_slice_of_each_planned_layer():
    whole, model = build_model("qwen2"), build_model("qwen2")
    shard_model(model, TensorParallel(rank=1, size=2))
    attention, full_attention = model.model.layers[0].self_attn, whole.model.layers[0].self_attn
    half = full_attention.k_proj.out_features // 2
    assert torch.equal(attention.k_proj.weight, full_attention.k_proj.weight[half:])
    assert torch.equal(attention.k_proj.bias, full_attention.k_proj.bias[half:])  # rank 1: the second half
    columns = full_attention.o_proj.in_features // 2
    assert torch.equal(attention.o_proj.weight, full_attention.o_proj.weight[:, columns:])
    assert torch.equal(model.lm_head.weight, whole.lm_head.weight)  # the head stays whole: every rank samples alike
