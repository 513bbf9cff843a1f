"""transformers causal LMs on graphhal's runners (``graphhal.transformers``): greedy generation equal to
``model.generate(do_sample=False)`` token for token.

Llama, Qwen2 and Mistral, built from their config classes with random weights (no download), in float32.
Every prompt is generated alone by transformers (its own attention, its own cache); graphhal generates them
together through the generation loop: prefill in packed chunks (a prompt longer than the largest prefill
bucket goes in several), decode in padded buckets, in every mode the device offers.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")  # before the integration, which imports it

from graphhal.transformers import (  # noqa: E402
    GenerationLoop,
    MissingBatchError,
    UnsupportedModelError,
    decode_runner,
    paged_kv_cache,
    prefill_runner,
)
from graphhal.paged_attention.block_allocator import OutOfBlocksError  # noqa: E402
from runners import DecodeConfig, PrefillConfig  # noqa: E402

NEW_TOKENS = 32
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
}
# (mode, compiler); None is the mode's default compiler.
CPU_MODES = [("disabled", None), ("full", None), ("breakable", None), ("piecewise", None), ("auto", None)]
# On cuda also Inductor-compiled forwards: every family's full+inductor, and Llama's in the other modes too
# (an Inductor compile per runner is tens of seconds, so not every family in every mode).
CUDA_CASES = [
    *((family, mode, compiler) for family in FAMILIES for mode, compiler in CPU_MODES),
    *((family, "full", "inductor") for family in FAMILIES),
    ("llama", "breakable", "inductor"),
    ("llama", "piecewise", "inductor"),
]
# Eight prompts of different lengths: one token, a few, and two longer than the 32-token prefill bucket.
PROMPT_LENGTHS = [1, 5, 12, 40, 3, 70, 17, 8]


def build_model(family: str, device: str) -> torch.nn.Module:
    config_name, model_name = FAMILIES[family]
    config = getattr(transformers, config_name)(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        # Wider than the default 0.02, so the top two logits of a step are rarely within rounding of each
        # other: a tie broken differently by two correct attentions is not what this test is after.
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).eval().to(device)


def prompts(count: int, vocab: int = 512) -> list[list[int]]:
    generator = torch.Generator().manual_seed(count)
    return [torch.randint(3, vocab, (PROMPT_LENGTHS[i],), generator=generator).tolist() for i in range(count)]


def generated_by_transformers(model: torch.nn.Module, prompt: list[int], new_tokens: int, **options) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, **options)
    return out[0, len(prompt) :].tolist()


_expected: dict[tuple, list[list[int]]] = {}


def expected_tokens(family: str, device: str, count: int) -> list[list[int]]:
    """transformers' own greedy generation of each prompt alone (with its default attention), computed once."""
    key = (family, device, count)
    if key not in _expected:
        model = build_model(family, device)
        _expected[key] = [generated_by_transformers(model, prompt, NEW_TOKENS) for prompt in prompts(count)]
    return _expected[key]


def build_loop(model, device: str, mode: str, compiler: str | None, *, max_requests: int = 8, **loop_options) -> GenerationLoop:
    """Prefill captured first, decode into its pool, as a server does (README)."""
    torch._dynamo.reset()
    kv_cache = paged_kv_cache(model, num_blocks=96, block_size=16, max_seq_len=256)
    prefill_config = PrefillConfig(mode=mode, compiler=compiler, max_tokens=32, max_requests=max_requests, show_progress=False)
    prefill = prefill_runner(model, kv_cache, device, prefill_config)
    prefill.capture()
    decode_config = DecodeConfig(mode=mode, compiler=compiler, max_bs=8, show_progress=False)
    decode = decode_runner(model, kv_cache, device, decode_config, pool=prefill.pool)
    decode.capture()
    assert decode.pool is prefill.pool  # one pool for both phases (None for both in mode disabled)
    return GenerationLoop(decode, prefill, kv_cache, eos_token_ids=model.generation_config.eos_token_id, **loop_options)


def run_generation_equality(device: str, family: str, mode: str, compiler: str | None, count: int) -> None:
    expected = expected_tokens(family, device, count)
    model = build_model(family, device)
    with torch.inference_mode():
        loop = build_loop(model, device, mode, compiler)
        got = loop.generate(prompts(count), NEW_TOKENS)
    assert got == expected
    assert loop.idle and loop.kv_cache.allocator.num_free == loop.kv_cache.num_blocks - 1  # every block back


@pytest.mark.cpu
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("mode,compiler", CPU_MODES, ids=[m for m, _ in CPU_MODES])
@pytest.mark.parametrize("count", [1, 8])
def test_greedy_generation_equals_transformers_generate_on_cpu(family, mode, compiler, count):
    run_generation_equality("cpu", family, mode, compiler, count)


@pytest.mark.cuda
@pytest.mark.parametrize("family,mode,compiler", CUDA_CASES, ids=[f"{f}-{m}-{c or 'default'}" for f, m, c in CUDA_CASES])
def test_greedy_generation_equals_transformers_generate_on_cuda(family, mode, compiler):
    run_generation_equality("cuda", family, mode, compiler, 8)


@pytest.mark.parametrize("mode", ["disabled", "full", "piecewise"])
def test_requests_joining_and_leaving_mid_stream_keep_their_tokens(graph_device, mode):
    """Requests arrive at different steps with different lengths to generate; the cache has blocks for a few at
    once, at most 3 run and a prefill batch takes 2 requests, so requests wait for blocks and places and
    prompts wait for prefill: each still gets exactly what it would get alone."""
    model = build_model("llama", graph_device)
    texts = prompts(8)
    budgets = [32, 7, 20, 3, 32, 12, 1, 25]
    arrivals = {0: [0, 1, 2], 2: [3], 3: [4, 5], 9: [6], 15: [7]}  # step -> requests added before it
    expected = {i: generated_by_transformers(model, texts[i], budgets[i]) for i in range(8)}
    with torch.inference_mode():
        loop = build_loop(model, graph_device, mode, None, max_requests=2, max_running=3)
        loop.kv_cache.allocator.allocate(96 - 1 - 9)  # leave 9 blocks free (of 16 tokens each)
        finished: dict[int, list[int]] = {}
        waited = []
        step = 0
        while step <= max(arrivals) or not loop.idle:
            for request in arrivals.get(step, []):
                loop.add(request, texts[request], budgets[request])
            finished.update(loop.step())
            waited.append(loop.num_waiting)
            assert loop.num_running <= 3
            step += 1
    assert finished == expected
    assert max(waited) >= 2  # the limits bound: requests did wait


def test_a_request_that_can_never_get_its_blocks_is_an_error_not_a_hang():
    model = build_model("llama", "cpu")
    with torch.inference_mode():
        loop = build_loop(model, "cpu", "disabled", None)
        loop.kv_cache.allocator.allocate(96 - 1 - 2)  # blocks held outside the loop: 2 left free
        loop.add("long", prompts(8)[5], 32)  # 70 + 31 tokens cached: 7 blocks
        with pytest.raises(OutOfBlocksError, match="'long' needs 7 KV-cache blocks and only 2 are free"):
            loop.step()


def test_generation_stops_at_an_end_of_sequence_token_as_generate_does():
    model = build_model("qwen2", "cpu")
    text = prompts(1)[0]
    eos = generated_by_transformers(model, text, 12, eos_token_id=None)[6]  # a token it will produce
    expected = generated_by_transformers(model, text, NEW_TOKENS, eos_token_id=eos)
    with torch.inference_mode():
        loop = build_loop(model, "cpu", "full", None)
        loop.eos_token_ids = frozenset({eos})
        got = loop.generate([text], NEW_TOKENS)[0]
    assert got == expected and got[-1] == eos and len(got) < NEW_TOKENS


def test_a_model_loaded_with_from_pretrained_runs(tmp_path):
    build_model("mistral", "cpu").save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    text = prompts(3)
    expected = [generated_by_transformers(model, prompt, 8) for prompt in text]
    with torch.inference_mode():
        loop = build_loop(model, "cpu", "full", None)
        assert loop.generate(text, 8) == expected


def test_a_model_whose_attention_cannot_be_swapped_is_refused_naming_why():
    class OwnAttentionLlama(transformers.LlamaForCausalLM):
        _supports_attention_backend = False

    model = OwnAttentionLlama(build_model("llama", "cpu").config).eval()
    kv_cache = paged_kv_cache(model, num_blocks=8, max_seq_len=64)
    with pytest.raises(UnsupportedModelError, match="_supports_attention_backend"):
        decode_runner(model, kv_cache, "cpu")


def test_attention_features_graphhal_does_not_compute_are_refused_when_the_runner_is_built():
    config = transformers.Gemma2Config(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
    )
    model = transformers.Gemma2ForCausalLM(config).eval()
    with pytest.raises(UnsupportedModelError, match=r"Gemma2ForCausalLM uses attention logit soft-capping \(attn_logit_softcapping=50"):
        decode_runner(model, paged_kv_cache(model, num_blocks=8, max_seq_len=64), "cpu")


def test_a_sliding_window_shorter_than_the_cache_is_refused():
    config = build_model("mistral", "cpu").config
    config.sliding_window = 64
    model = transformers.MistralForCausalLM(config).eval()
    kv_cache = paged_kv_cache(model, num_blocks=8, max_seq_len=128)
    with pytest.raises(UnsupportedModelError, match="sliding-window attention over 64 tokens.*max_seq_len=64.*asked for 128"):
        decode_runner(model, kv_cache, "cpu")
    decode_runner(model, paged_kv_cache(model, num_blocks=8, max_seq_len=64), "cpu")  # within the window: fine


def test_calling_the_model_outside_a_graphhal_step_names_what_is_missing():
    model = build_model("llama", "cpu")
    decode_runner(model, paged_kv_cache(model, num_blocks=8, max_seq_len=64), "cpu")  # switches its attention
    with pytest.raises(MissingBatchError, match="without graphhal_kv_cache, graphhal_slot_mapping"):
        model(input_ids=torch.tensor([[5, 6]]), use_cache=False)


def test_the_loop_refuses_requests_it_cannot_serve():
    model = build_model("llama", "cpu")
    loop = build_loop(model, "cpu", "disabled", None)
    with pytest.raises(ValueError, match="empty prompt"):
        loop.add("a", [], 4)
    with pytest.raises(ValueError, match="caches up to 257 tokens .*at most 256 per request"):
        loop.add("b", [5] * 250, 8)
    loop.add("fits", [5] * 250, 7)  # 256 cached: the last of its 7 tokens is never fed back
    loop.add("c", [5], 2)
    with pytest.raises(ValueError, match="already queued"):
        loop.add("c", [6], 2)
    with pytest.raises(RuntimeError, match="still has requests queued or running"):
        loop.generate([[5, 6]], 2)
