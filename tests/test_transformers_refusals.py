"""What graphhal cannot serve of a transformers model is refused before anything runs, by name, and a step
never computes with attention that is not graphhal's (``graphhal.transformers.layers``, ``.attention``,
``.steps``).

- Hybrid models, with a convolution, state-space or linear-attention layer beside attention: each such layer
  named (index, layer class, mixer class) when a runner is built.
- Attention graphhal's kernels do not compute: logit soft-capping (Gemma 2), sliding windows and attention
  chunks (Llama 4) shorter than the served length.
- At run time, every eager step checks that the model is still set to graphhal's attention and that every
  layer called it: ``set_attn_implementation("sdpa")`` after the runners were built, or a layer whose
  attention the static check could not see through, is an error, not wrong tokens.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")  # before the integration, which imports it

from graphhal.transformers import (  # noqa: E402
    AttentionSwitchedError,
    GenerationLoop,
    MissingBatchError,
    RequestFailedError,
    UnsupportedModelError,
    decode_runner,
    paged_kv_cache,
    prefill_runner,
    use_graphhal_attention,
)
from graphhal.sampling import SamplingParams, sampling_inputs  # noqa: E402
from runners import DecodeConfig, PrefillConfig  # noqa: E402
from support.transformers_models import build_config, build_model, generated_by_transformers  # noqa: E402

HYBRID_SHAPE = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256,
)
MAMBA2 = dict(mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16)
LINEAR_THEN_FULL = ["linear_attention", "full_attention"] * 2
# name -> (config and model class prefix, what the family needs, {refused layer: "LayerClass: child is MixerClass"})
HYBRIDS = {
    "lfm2": ("Lfm2", dict(layer_types=["conv", "full_attention"] * 2), {0: "Lfm2DecoderLayer: conv is Lfm2ShortConv"}),
    "granite-moe-hybrid": (
        "GraniteMoeHybrid", dict(MAMBA2, layer_types=["mamba", "attention"] * 2),
        {0: "GraniteMoeHybridDecoderLayer: mamba is GraniteMoeHybridMambaLayer"},
    ),
    "jamba": (
        "Jamba", dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=2, mamba_d_state=16),
        {0: "JambaMambaDecoderLayer: mamba is JambaMambaMixer"},
    ),
    "bamba": ("Bamba", dict(MAMBA2, attn_layer_indices=[1, 3]), {0: "BambaDecoderLayer: mamba is BambaMixer"}),
    "nemotron-h": (
        "NemotronH", dict(hybrid_override_pattern="M*M*", mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, n_groups=1),
        {0: "NemotronHBlock: mixer is NemotronHMamba2Mixer"},
    ),
    "falcon-h1": (  # attention and a Mamba mixer side by side in every layer
        "FalconH1", dict(mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16, head_dim=16),
        {0: "FalconH1DecoderLayer: mamba is FalconH1Mixer", 1: "FalconH1DecoderLayer: mamba is FalconH1Mixer"},
    ),
    "zamba2": (
        "Zamba2", dict(mamba_d_state=16, mamba_headdim=16, n_mamba_heads=8, num_mem_blocks=1, layers_block_type=["mamba", "hybrid"] * 2),
        {0: "Zamba2MambaDecoderLayer: mamba is Zamba2MambaMixer", 1: "Zamba2HybridLayer"},
    ),
    "qwen3-next": (
        "Qwen3Next",
        dict(
            layer_types=LINEAR_THEN_FULL, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32,
            linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16, head_dim=16,
        ),
        {0: "Qwen3NextDecoderLayer: linear_attn is Qwen3NextGatedDeltaNet"},
    ),
    "minimax": (
        "MiniMax", dict(layer_types=LINEAR_THEN_FULL, num_local_experts=2, head_dim=16, block_size=16),
        {0: "MiniMaxDecoderLayer: self_attn is MiniMaxLightningAttention"},
    ),
    "recurrent-gemma": (
        "RecurrentGemma", dict(block_types=["recurrent", "attention"], lru_width=64, attention_window_size=256),
        {0: "RecurrentGemmaDecoderLayer: temporal_block is RecurrentGemmaRecurrentBlock"},
    ),
}


def build_hybrid(prefix: str, extra: dict) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notes of some hybrid configs
        config = getattr(transformers, f"{prefix}Config")(**{**HYBRID_SHAPE, **extra})
        torch.manual_seed(0)
        return getattr(transformers, f"{prefix}ForCausalLM")(config).eval()


@pytest.mark.parametrize("name", sorted(HYBRIDS))
def test_a_hybrid_model_is_refused_naming_each_layer_graphhal_does_not_serve(name):
    prefix, extra, refused = HYBRIDS[name]
    model = build_hybrid(prefix, extra)
    kv_cache = paged_kv_cache(model, num_blocks=8, max_seq_len=64)
    with pytest.raises(UnsupportedModelError) as refusal:
        decode_runner(model, kv_cache, "cpu", DecodeConfig(mode="disabled"))
    message = str(refusal.value)
    assert f"{type(model).__name__} has " in message and "decoder layers that graphhal does not serve" in message
    for index, described in refused.items():
        assert f"layer {index} ({described}" in message
    assert "state per request" in message and "generate()" in message  # why, and what to do instead
    # The attention layers between them are not named (Falcon-H1 and Zamba2 mix in every layer).
    if len(refused) == 1:
        assert "layer 1 (" not in message and "layer 3 (" not in message


def test_lfm2_with_only_attention_layers_is_served():
    """The refusal is per layer, not per family: an LFM2 configured without convolution layers is plain attention."""
    model = build_hybrid("Lfm2", dict(layer_types=["full_attention"] * 4))
    use_graphhal_attention(model, 64)


def test_chunked_attention_shorter_than_the_cache_is_refused_and_a_long_enough_chunk_is_not():
    config = transformers.Llama4TextConfig(**HYBRID_SHAPE, attention_chunk_size=64, num_local_experts=2, intermediate_size_mlp=128, head_dim=16)
    model = transformers.Llama4ForCausalLM(config).eval()
    with pytest.raises(
        UnsupportedModelError,
        match=r"Llama4ForCausalLM uses chunked attention \(attention_chunk_size=64.*in layers 0, 1, 2,.*max_seq_len=64 .*asked for 128",
    ):
        use_graphhal_attention(model, 128)
    use_graphhal_attention(model, 64)  # every request within one chunk: plain causal attention


def test_a_model_whose_attention_cannot_be_swapped_is_refused_naming_why():
    class OwnAttentionLlama(transformers.LlamaForCausalLM):
        _supports_attention_backend = False

    model = OwnAttentionLlama(build_config("llama")).eval()
    kv_cache = paged_kv_cache(model, num_blocks=8, max_seq_len=64)
    with pytest.raises(UnsupportedModelError, match="_supports_attention_backend"):
        decode_runner(model, kv_cache, "cpu")


def test_gemma2_attention_logit_soft_capping_is_refused_when_the_runner_is_built():
    """graphhal's attention kernels do not soft-cap logits; every Gemma 2 checkpoint does (50.0)."""
    config = transformers.Gemma2Config(**{**HYBRID_SHAPE, "num_hidden_layers": 2}, head_dim=16)
    model = transformers.Gemma2ForCausalLM(config).eval()
    with pytest.raises(UnsupportedModelError, match=r"Gemma2ForCausalLM uses attention logit soft-capping \(attn_logit_softcapping=50"):
        decode_runner(model, paged_kv_cache(model, num_blocks=8, max_seq_len=64), "cpu")


def test_a_sliding_window_shorter_than_the_cache_is_refused():
    model = build_model("mistral", sliding_window=64)
    kv_cache = paged_kv_cache(model, num_blocks=8, max_seq_len=128)
    with pytest.raises(UnsupportedModelError, match="sliding-window attention over 64 tokens.*max_seq_len=64.*asked for 128"):
        decode_runner(model, kv_cache, "cpu")
    decode_runner(model, paged_kv_cache(model, num_blocks=8, max_seq_len=64), "cpu")  # within the window: fine


def test_calling_the_model_outside_a_graphhal_step_names_what_is_missing():
    model = build_model("llama")
    decode_runner(model, paged_kv_cache(model, num_blocks=8, max_seq_len=64), "cpu")  # switches its attention
    with pytest.raises(MissingBatchError, match="without graphhal_kv_cache, graphhal_slot_mapping"):
        model(input_ids=torch.tensor([[5, 6]]), use_cache=False)


# --- at run time ------------------------------------------------------------------------------------------


def build_loop(model: torch.nn.Module, mode: str, *, max_bs: int = 4) -> GenerationLoop:
    torch._dynamo.reset()
    kv_cache = paged_kv_cache(model, num_blocks=32, block_size=16, max_seq_len=128)
    prefill = prefill_runner(model, kv_cache, "cpu", PrefillConfig(mode=mode, max_tokens=16, buckets=[16], max_requests=4, show_progress=False))
    prefill.capture()
    decode = decode_runner(model, kv_cache, "cpu", DecodeConfig(mode=mode, max_bs=max_bs, buckets=[max_bs], show_progress=False), pool=prefill.pool)
    decode.capture()
    return GenerationLoop(decode, prefill, kv_cache)


def test_switching_attention_back_after_the_runners_were_built_is_an_error_at_the_next_step():
    """The issue's case: ``set_attn_implementation("sdpa")`` (for ``generate``, say) left a loop in mode disabled
    computing every step with SDPA over the packed tokens, without the cache: wrong tokens, no error."""
    model = build_model("llama")
    prompt = [5, 9, 11]
    expected = generated_by_transformers(model, prompt, 4)
    with torch.inference_mode():
        loop = build_loop(model, "disabled")
        model.set_attn_implementation("sdpa")
        # The step fails, and with it the request in it (the loop goes on with any other): generate raises it.
        with pytest.raises(RequestFailedError) as failure:
            loop.generate([prompt], 4)
        assert isinstance(failure.value.__cause__, AttentionSwitchedError)
        assert re.search(r"LlamaForCausalLM's attention is 'sdpa', not graphhal's.*use_graphhal_attention\(model, max_seq_len\) again", str(failure.value))
    use_graphhal_attention(model, 128)  # what the error says to do
    with torch.inference_mode():
        assert build_loop(model, "disabled").generate([prompt], 4) == [expected]


def test_a_batch_run_eagerly_beside_captured_graphs_checks_the_attention_too():
    """In a graph mode, a batch over the largest bucket runs the step eagerly: it checks as mode disabled does.
    (A replayed graph still holds graphhal's attention, switched or not.)"""
    model = build_model("llama")
    with torch.inference_mode():
        loop = build_loop(model, "full", max_bs=2)
        model.set_attn_implementation("sdpa")
        batch = decode_batch(loop, rows=3)  # over max_bs=2: eager
        with pytest.raises(AttentionSwitchedError, match="'sdpa', not graphhal's"):
            loop.decode.run(batch)


def test_a_layer_that_does_not_call_graphhal_attention_is_named_at_the_first_step():
    """The runtime half of the hybrid check: a layer mixing tokens some way the static check cannot see (here
    an attention module whose instance forward was replaced) makes the step fail, naming the layer."""
    model = build_model("llama")
    attention = model.model.layers[1].self_attn
    attention.forward = lambda hidden_states, *args, **kwargs: (torch.zeros_like(hidden_states), None)
    with torch.inference_mode():
        loop = build_loop(model, "disabled")
        with pytest.raises(RequestFailedError) as failure:  # the step fails, and the request in it
            loop.generate([[5, 9, 11]], 2)
    assert isinstance(failure.value.__cause__, UnsupportedModelError)
    assert "1 of its 2 decoder layers computed this step without graphhal's attention: layer 1 (LlamaDecoderLayer: did not call graphhal's attention in this step)" in str(failure.value)


def decode_batch(loop: GenerationLoop, rows: int) -> dict[str, torch.Tensor]:
    """One decode step of ``rows`` requests, each at position 0 of a block of its own."""
    dtypes = {slot.name: slot.dtype for slot in loop.decode.slots}
    blocks = list(range(1, rows + 1))
    tables = torch.zeros(rows, loop.kv_cache.config.max_blocks_per_seq, dtype=dtypes["block_tables"])
    tables[:, 0] = torch.tensor(blocks)
    return {
        "input_ids": torch.full((rows,), 5, dtype=dtypes["input_ids"]),
        "positions": torch.zeros(rows, dtype=dtypes["positions"]),
        "seq_lens": torch.ones(rows, dtype=dtypes["seq_lens"]),
        "block_tables": tables,
        "slot_mapping": torch.tensor([block * loop.kv_cache.block_size for block in blocks], dtype=dtypes["slot_mapping"]),
        **sampling_inputs([SamplingParams.greedy()] * rows, [0] * rows, "cpu"),
    }
