"""Tiny random transformers models of each family the integration is tested on, built from their config
classes (nothing is downloaded); transformers' own greedy generation to compare with; and graphhal's, through
the generation loop over runners in a given mode.

Every family has the same small shape (2 layers, hidden 128, 4 heads over 2 KV heads, vocabulary 512) plus
what the family needs to be itself (experts, a head dim, a window). The weights are drawn with a standard
deviation of 0.2 rather than the usual 0.02, so that the top two logits of a step are rarely within rounding
of each other: a tie broken differently by two correct attentions is not what the tests are after.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

MAX_POSITIONS = 256
SHAPE = dict(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS, initializer_range=0.2,
)
MOE = dict(num_experts_per_tok=2)

# family -> (config class, model class, what the family adds to SHAPE)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=32)),
    # Gemma 3's text model: sliding-window layers (window no shorter than the served length) beside full ones,
    # each kind with its own rotary base; query-key norms.
    "gemma3_text": (
        "Gemma3TextConfig", "Gemma3ForCausalLM",
        dict(head_dim=32, sliding_window=MAX_POSITIONS, layer_types=["sliding_attention", "full_attention"]),
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)),  # defaults past the vocabulary
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(MOE, num_local_experts=4)),
    "qwen2_moe": (
        "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
        dict(MOE, num_experts=4, moe_intermediate_size=64, shared_expert_intermediate_size=128),
    ),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(MOE, num_experts=4, moe_intermediate_size=64, head_dim=32)),
}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
MODES = ["disabled", "full", "breakable", "piecewise", "auto"]


def build_config(family: str, **overrides: Any) -> Any:
    import transformers

    config_name, _, extra = FAMILIES[family]
    return getattr(transformers, config_name)(**{**SHAPE, **extra, **overrides})


def build_model(family: str, device: str = "cpu", dtype: torch.dtype = torch.float32, **overrides: Any) -> torch.nn.Module:
    """``family``'s tiny model with seeded random weights, in eval mode on ``device``."""
    import transformers

    _, model_name, _ = FAMILIES[family]
    config = build_config(family, **overrides)
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).eval().to(device=device, dtype=dtype)


def generated_by_transformers(model: torch.nn.Module, prompt: list[int], new_tokens: int, **options: Any) -> list[int]:
    """``model.generate(do_sample=False)``'s new tokens for ``prompt`` alone, with the model's own attention."""
    ids = torch.tensor([prompt], device=model.device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, **options)
    return out[0, len(prompt) :].tolist()


@functools.cache
def dynamo_reads_code_objects() -> bool:
    """Whether this torch's Dynamo traces ``function.__code__.co_varnames``, which transformers 5's forward
    wrappers read (``merge_with_config_defaults``). torch 2.6's does not ("call_method
    GetAttrVariable(GetSetDescriptorVariable(), co_varnames) __contains__"): no mode that compiles the model
    (piecewise, compiler inductor) can run a transformers 5 model there. torch 2.9 and 2.13 do."""

    def step(x, use_cache=None):
        return x

    def reads_code(x):
        return x + 1 if "use_cache" in step.__code__.co_varnames else x

    try:
        torch.compile(reads_code, backend="eager", fullgraph=True)(torch.ones(1))
    except torch._dynamo.exc.Unsupported:
        return False
    return True


def skip_where_torch_cannot_compile_the_model(mode: str, compiler: str | None) -> None:
    """Skip a test of a mode that compiles the model on a torch that cannot (``dynamo_reads_code_objects``)."""
    if (mode == "piecewise" or compiler == "inductor") and not dynamo_reads_code_objects():
        import transformers

        pytest.skip(f"torch {torch.__version__} cannot compile transformers {transformers.__version__}'s forward (dynamo_reads_code_objects)")


def prompts(lengths: tuple[int, ...], vocab: int = 512) -> list[list[int]]:
    """Random prompts of these lengths (ids from 3 up: clear of the usual special tokens), the same every run."""
    generator = torch.Generator().manual_seed(len(lengths))
    return [torch.randint(3, vocab, (length,), generator=generator).tolist() for length in lengths]


def generate_through_graphhal(
    model: torch.nn.Module,
    device: str,
    texts: list[list[int]],
    new_tokens: int,
    mode: str,
    compiler: str | None = None,
    *,
    prefill_buckets: list[int] | None = None,
    decode_buckets: list[int] | None = None,
    group: Any = None,
) -> list[list[int]]:
    """graphhal's greedy tokens for ``texts``, generated together by the generation loop over runners in
    ``mode``: prefill captured first (at most 32 tokens a batch), decode (at most 8 requests) into its pool, as
    a server does. Every KV-cache block is back at the end. ``group``: the runners' rank group (tensor
    parallel: every rank runs this with the same texts)."""
    from graphhal.transformers import GenerationLoop, decode_runner, paged_kv_cache, prefill_runner
    from runners import DecodeConfig, PrefillConfig

    skip_where_torch_cannot_compile_the_model(mode, compiler)
    torch._dynamo.reset()
    with torch.inference_mode():
        kv_cache = paged_kv_cache(model, num_blocks=96, block_size=16, max_seq_len=256)
        prefill = prefill_runner(
            model, kv_cache, device,
            PrefillConfig(mode=mode, compiler=compiler, max_tokens=32, buckets=prefill_buckets, max_requests=8, show_progress=False),
            group=group,
        )
        prefill.capture()
        decode = decode_runner(
            model, kv_cache, device,
            DecodeConfig(mode=mode, compiler=compiler, max_bs=8, buckets=decode_buckets, show_progress=False),
            pool=prefill.pool, group=group,
        )
        decode.capture()
        loop = GenerationLoop(decode, prefill, kv_cache, eos_token_ids=model.generation_config.eos_token_id)
        generated = loop.generate(texts, new_tokens)
    assert loop.idle and kv_cache.allocator.num_free == kv_cache.num_blocks - 1
    return generated
