"""The generation loop over transformers models (``graphhal.transformers``): continuous batching that keeps
every request's tokens what ``model.generate(do_sample=False)`` gives it alone.

Which families generate right in which modes: ``test_transformers_families.py``; what is refused:
``test_transformers_refusals.py`` and ``test_transformers_moe.py``. Models are tiny random ones built from their
config classes (``support.transformers_models``), in float32.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")  # before the integration, which imports it

from graphhal.transformers import GenerationLoop, decode_runner, paged_kv_cache, prefill_runner  # noqa: E402
from graphhal.paged_attention.block_allocator import OutOfBlocksError  # noqa: E402
from runners import DecodeConfig, PrefillConfig  # noqa: E402
from support.transformers_models import build_model, generated_by_transformers  # noqa: E402

NEW_TOKENS = 32
# Eight prompts of different lengths: one token, a few, and two longer than the 32-token prefill bucket.
PROMPT_LENGTHS = [1, 5, 12, 40, 3, 70, 17, 8]


def prompts(count: int, vocab: int = 512) -> list[list[int]]:
    generator = torch.Generator().manual_seed(count)
    return [torch.randint(3, vocab, (PROMPT_LENGTHS[i],), generator=generator).tolist() for i in range(count)]


def build_loop(model, device: str, mode: str, compiler: str | None, *, max_requests: int = 8, **loop_options) -> GenerationLoop:
    """Prefill captured first, decode into its pool, as a server does (README); two buckets per phase."""
    torch._dynamo.reset()
    kv_cache = paged_kv_cache(model, num_blocks=96, block_size=16, max_seq_len=256)
    prefill_config = PrefillConfig(
        mode=mode, compiler=compiler, max_tokens=32, buckets=[16, 32], max_requests=max_requests, show_progress=False
    )
    prefill = prefill_runner(model, kv_cache, device, prefill_config)
    prefill.capture()
    decode_config = DecodeConfig(mode=mode, compiler=compiler, max_bs=8, buckets=[4, 8], show_progress=False)
    decode = decode_runner(model, kv_cache, device, decode_config, pool=prefill.pool)
    decode.capture()
    assert decode.pool is prefill.pool  # one pool for both phases (None for both in mode disabled)
    return GenerationLoop(decode, prefill, kv_cache, eos_token_ids=model.generation_config.eos_token_id, **loop_options)


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
