"""Mixture-of-experts models on graphhal's runners (``graphhal.transformers.experts``).

A captured step must not read the experts' routing on the host: a graph would take that read once, at
capture. Which of transformers' experts implementations does, per device, dtype and compile, is decided before
a runner is built, and such a model is refused saying what to change. On cuda, the MoE families generate what
transformers generates in every mode (float32, with the graph-safe ``batched_mm`` experts), and in bfloat16
with transformers' default ``grouped_mm`` every graph mode replays what mode ``disabled`` computes.

Every family in every mode on cpu: ``test_transformers_families.py``.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")  # before the integration, which imports it

from graphhal.transformers import UnsupportedModelError, decode_runner, experts, paged_kv_cache  # noqa: E402
from runners import DecodeConfig, PrefillConfig  # noqa: E402
from support.transformers_models import (  # noqa: E402
    MODES,
    MOE_FAMILIES,
    build_model,
    generate_through_graphhal,
    generated_by_transformers,
    prompts,
)

INDUCTOR_MODES = ["full", "breakable", "piecewise"]
CUDA_PROMPTS = prompts((1, 5, 12, 40, 3, 70, 17, 8))
CUDA_NEW_TOKENS = 32

# --- which implementations read the routing on the host -----------------------------------------------------


def read_on_host(implementation, device_type="cuda", dtype=torch.float32, *, compiled=False, usable=True, syncs=False):
    return experts.routing_read_on_host(
        implementation, device_type, dtype, compiled=compiled, torch_grouped_mm_usable=usable, torch_grouped_mm_syncs=syncs
    )


def test_the_eager_experts_loop_reads_the_routing_on_the_host_on_every_device():
    for device_type in ("cpu", "cuda", "npu"):
        assert "nonzero" in read_on_host("eager", device_type)
    assert "nonzero" in read_on_host(None)  # no implementation set: the class's own loop


def test_grouped_mm_reads_the_offsets_on_the_host_where_no_device_side_grouped_matmul_runs():
    # Under torch.compile transformers runs non-bfloat16 experts through its own fallback op.
    assert "offs.tolist()" in read_on_host("grouped_mm", dtype=torch.float32, compiled=True)
    assert "offs.tolist()" in read_on_host("grouped_mm", dtype=torch.float16, compiled=True)
    # Where transformers' eager test finds no grouped matmul of torch's, the same op.
    assert "offs.tolist()" in read_on_host("grouped_mm", dtype=torch.bfloat16, usable=False)
    # torch's own grouped matmul without a device kernel for this dtype and GPU.
    assert "offs.cpu()" in read_on_host("grouped_mm", dtype=torch.float32, syncs=True)
    # bfloat16 on a GPU whose grouped matmul runs on the device: compiled or not, nothing read on the host.
    assert read_on_host("grouped_mm", dtype=torch.bfloat16, compiled=True) is None
    assert read_on_host("grouped_mm", dtype=torch.bfloat16) is None


def test_batched_mm_and_the_cpu_grouped_mm_keep_the_routing_where_a_replay_reads_it():
    assert read_on_host("batched_mm", compiled=True) is None
    # On the cpu the offsets are in host memory already, and the recorded graph re-runs the whole op per replay.
    assert read_on_host("grouped_mm", "cpu", compiled=True, usable=False, syncs=True) is None
    assert read_on_host("deepgemm") is None  # kernels of their own: not known here, not refused


class FakeCudaDevice:
    """What the check reads of a ``hal.Device``: its torch device (there is no GPU here)."""

    torch_device = torch.device("cuda", 0)

    def __str__(self) -> str:
        return "cuda:0"


def fake_cuda_device() -> FakeCudaDevice:
    return FakeCudaDevice()


@pytest.mark.parametrize(
    "dtype,config,syncs,refused",
    [
        (torch.float32, PrefillConfig(mode="piecewise", max_tokens=32), False, "offs.tolist()"),
        (torch.float32, DecodeConfig(mode="full", compiler="inductor", max_bs=8), False, "offs.tolist()"),
        (torch.float32, DecodeConfig(mode="full", max_bs=8), True, "offs.cpu()"),
        (torch.float32, DecodeConfig(mode="disabled", max_bs=8), True, None),  # nothing captured
        (torch.bfloat16, DecodeConfig(mode="full", compiler="inductor", max_bs=8), False, None),
    ],
    ids=["piecewise-f32", "full-inductor-f32", "full-f32-torch-syncs", "disabled", "full-inductor-bf16"],
)
def test_a_mixtral_is_checked_for_the_device_dtype_and_compile_its_runner_captures(monkeypatch, dtype, config, syncs, refused):
    """The decision ``check_experts_capturable`` makes for a cuda runner, with torch's grouped matmul's answer
    (does it read its offsets on the host?) given rather than measured: there is no GPU here."""
    model = build_model("mixtral", dtype=dtype)
    monkeypatch.setattr(experts, "_torch_grouped_mm_usable", lambda weight: True)
    monkeypatch.setattr(experts, "grouped_mm_syncs", lambda module, weight: syncs)
    if refused is None:
        experts.check_experts_capturable(model, fake_cuda_device(), config)
        return
    with pytest.raises(UnsupportedModelError) as refusal:
        experts.check_experts_capturable(model, fake_cuda_device(), config)
    message = str(refusal.value)
    assert f"MixtralForCausalLM's experts (MixtralExperts, experts_implementation 'grouped_mm') would read the routing on the host inside a {config.phase} step captured in mode '{config.mode}'" in message
    assert refused in message
    assert "load the model in bfloat16" in message and "set_experts_implementation('batched_mm')" in message and "mode 'disabled'" in message
    model.set_experts_implementation("batched_mm")  # what the message offers: accepted
    experts.check_experts_capturable(model, fake_cuda_device(), config)


def test_experts_set_to_the_eager_loop_are_refused_before_a_graph_is_captured_on_cpu():
    """Before: the capture failed inside the cpu recorded graph at the loop's ``nonzero``."""
    model = build_model("qwen3_moe")
    model.set_experts_implementation("eager")
    kv_cache = paged_kv_cache(model, num_blocks=8, max_seq_len=64)
    with pytest.raises(UnsupportedModelError, match=r"Qwen3MoeForCausalLM's experts \(Qwen3MoeExperts, experts_implementation 'eager'\).*nonzero"):
        decode_runner(model, kv_cache, "cpu", DecodeConfig(mode="full", max_bs=4))
    decode_runner(model, kv_cache, "cpu", DecodeConfig(mode="disabled", max_bs=4))  # eager steps: served


# --- cuda ---------------------------------------------------------------------------------------------------

FLOAT32_CASES = [*((f, m, None) for f in MOE_FAMILIES for m in MODES), *((f, m, "inductor") for f in MOE_FAMILIES for m in INDUCTOR_MODES)]
_expected_float32: dict[str, list[list[int]]] = {}


@pytest.mark.cuda
@pytest.mark.parametrize("family,mode,compiler", FLOAT32_CASES, ids=[f"{f}-{m}-{c or 'default'}" for f, m, c in FLOAT32_CASES])
def test_moe_families_generate_what_transformers_generates_on_cuda(family, mode, compiler):
    """float32, experts ``batched_mm`` (graph-safe in every dtype; generate() decodes with it on GPUs too)."""
    model = build_model(family, "cuda")
    model.set_experts_implementation("batched_mm")
    if family not in _expected_float32:
        reference = build_model(family, "cuda")
        reference.set_experts_implementation("batched_mm")
        _expected_float32[family] = [generated_by_transformers(reference, text, CUDA_NEW_TOKENS) for text in CUDA_PROMPTS]
    assert generate_through_graphhal(model, "cuda", CUDA_PROMPTS, CUDA_NEW_TOKENS, mode, compiler) == _expected_float32[family]


@pytest.mark.cuda
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_float32_grouped_mm_experts_on_cuda_are_refused_or_served_right(family):
    """Where torch's grouped matmul has no float32 kernel on the device (torch 2.10/2.11: bfloat16 on SM90/SM100
    only), the runner is refused before capture, naming the host read; where it has one, it serves right."""
    model = build_model(family, "cuda")
    assert set(experts.implementations(model).values()) == {"grouped_mm"}
    expected = [generated_by_transformers(model, text, 8) for text in CUDA_PROMPTS[:3]]
    try:
        got = generate_through_graphhal(model, "cuda", CUDA_PROMPTS[:3], 8, "full")
    except UnsupportedModelError as refusal:
        assert "would read the routing on the host" in str(refusal) and "offs.cpu()" in str(refusal)
    else:
        assert got == expected


BFLOAT16_CASES = [
    *((f, m, None) for f in MOE_FAMILIES for m in MODES if m != "disabled"),
    *((f, m, "inductor") for f in MOE_FAMILIES for m in INDUCTOR_MODES),
]
_disabled_bfloat16: dict[str, list[list[int]]] = {}


@pytest.mark.cuda
@pytest.mark.parametrize("family,mode,compiler", BFLOAT16_CASES, ids=[f"{f}-{m}-{c or 'default'}" for f, m, c in BFLOAT16_CASES])
def test_moe_families_in_bfloat16_replay_what_mode_disabled_computes_on_cuda(family, mode, compiler):
    """The issue's setup: bfloat16, transformers' default ``grouped_mm`` experts (torch's device-side grouped
    matmul on SM90). Graphs must change nothing: every mode's tokens are mode disabled's.

    Not ``generate``'s: in bfloat16 graphhal's attention kernels round differently from SDPA, and a MoE's top-k
    routing turns a last-bit difference into another expert, so a random model's tokens drift apart after a
    few steps even with no graph (seen on cpu). And Inductor by default keeps fused intermediates in float32
    where eager rounds them to bfloat16, which flips routing the same way (on cpu: 16 of 320 next-token
    argmaxes of a tiny Mixtral differ between eager and Inductor; none with ``emulate_precision_casts``). So
    Inductor runs here with ``emulate_precision_casts``, which keeps eager's roundings: what is left to differ
    is what graphs would do wrong, such as a routing baked in at capture.
    """
    if torch.cuda.get_device_capability()[0] not in (9, 10):
        pytest.skip("torch's grouped matmul runs bfloat16 on the device on SM90/SM100 GPUs only")
    if family not in _disabled_bfloat16:
        _disabled_bfloat16[family] = generate_through_graphhal(
            build_model(family, "cuda", torch.bfloat16), "cuda", CUDA_PROMPTS, 16, "disabled"
        )
    model = build_model(family, "cuda", torch.bfloat16)
    with torch._inductor.config.patch(emulate_precision_casts=True):
        got = generate_through_graphhal(model, "cuda", CUDA_PROMPTS, 16, mode, compiler)
    assert got == _disabled_bfloat16[family]
