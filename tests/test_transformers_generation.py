"""The generation loop over transformers models (``graphhal.transformers``): continuous batching that keeps
every request's tokens what ``model.generate(do_sample=False)`` gives it alone.

Which families generate right in which modes: ``test_transformers_families.py``; what is refused:
``test_transformers_refusals.py`` and ``test_transformers_moe.py``. Models are tiny random ones built from their
config classes (``support.transformers_models``), in float32.
"""

from __future__ import annotations

import itertools

import pytest
import torch

transformers = pytest.importorskip("transformers")  # before the integration, which imports it

from graphhal.transformers import GenerationLoop, RequestFailedError, decode_runner, paged_kv_cache, prefill_runner  # noqa: E402
from graphhal.paged_attention.block_allocator import OutOfBlocksError  # noqa: E402
from runners import DecodeConfig, PrefillConfig  # noqa: E402
from support.transformers_models import build_model, generated_by_transformers, skip_where_torch_cannot_compile_the_model  # noqa: E402

NEW_TOKENS = 32
# Eight prompts of different lengths: one token, a few, and two longer than the 32-token prefill bucket.
PROMPT_LENGTHS = [1, 5, 12, 40, 3, 70, 17, 8]


def prompts(count: int, vocab: int = 512) -> list[list[int]]:
    generator = torch.Generator().manual_seed(count)
    return [torch.randint(3, vocab, (PROMPT_LENGTHS[i],), generator=generator).tolist() for i in range(count)]


def build_loop(model, device: str, mode: str, compiler: str | None, *, max_requests: int = 8, **loop_options) -> GenerationLoop:
    """Prefill captured first, decode into its pool, as a server does (README); two buckets per phase."""
    skip_where_torch_cannot_compile_the_model(mode, compiler)
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
    with pytest.raises(ValueError, match="request 'a' has an empty prompt"):
        loop.add("a", [], 4)
    with pytest.raises(ValueError, match="caches up to 257 tokens .*at most 256 per request"):
        loop.add("b", [5] * 250, 8)
    loop.add("fits", [5] * 250, 7)  # 256 cached: the last of its 7 tokens is never fed back
    loop.add("c", [5], 2)
    with pytest.raises(ValueError, match="already queued"):
        loop.add("c", [6], 2)
    with pytest.raises(RuntimeError, match="still has requests queued or running"):
        loop.generate([[5, 6]], 2)


# --- requests the loop refuses, and runs that fail -------------------------------------------------------


def build_gpt2(n_positions: int = 64) -> torch.nn.Module:
    """GPT-2 reads its positions from a learned table (``wpe``) of ``n_positions`` rows."""
    config = transformers.GPT2Config(
        vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=n_positions, bos_token_id=1, eos_token_id=2,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_token_ids_outside_the_vocabulary_are_refused_when_added_not_in_a_step():
    """An id past the embedding is an IndexError in every later step on cpu (a device-side assert that ends the
    process on CUDA): refused by add(), naming the request, where the id sits and what is allowed."""
    model = build_model("llama", "cpu")
    text = prompts(1)[0]
    expected = generated_by_transformers(model, text, 4)
    with torch.inference_mode():
        loop = build_loop(model, "cpu", "disabled", None)
        assert loop.limits.vocab_size == 512
        with pytest.raises(ValueError, match=r"request 'a': prompt\[1\] is token id 512, outside the vocabulary: .*ids 0 to 511"):
            loop.add("a", [5, 512, 6], 4)
        with pytest.raises(ValueError, match=r"request 'b': prompt\[0\] is token id -1, outside the vocabulary"):
            loop.add("b", [-1], 4)
        assert loop.idle
        assert loop.generate([text], 4) == [expected]  # nothing of them is left behind


def test_a_request_longer_than_a_learned_position_table_is_refused_when_added():
    """GPT-2 embeds 64 positions here, and its KV cache holds 256 tokens a request: a request feeding position 64
    or later is refused (it would fail every step after it got there); one feeding 0 to 63 runs."""
    model = build_gpt2(n_positions=64)
    text = prompts(6)[5][:60]
    expected = generated_by_transformers(model, text, 5)
    with torch.inference_mode():
        loop = build_loop(model, "cpu", "disabled", None)
        assert loop.limits.max_positions == 64
        with pytest.raises(ValueError, match=r"request 'long' feeds the model positions 0 to 68 \(prompt 60 \+ 10 new.*wpe.*0 to 63 only"):
            loop.add("long", text, 10)
        assert loop.idle
        assert loop.generate([text], 5) == [expected]  # positions 0 to 63: the whole table


def test_a_rotary_model_has_no_position_limit_but_its_kv_cache():
    with torch.inference_mode():
        loop = build_loop(build_model("qwen2", "cpu"), "cpu", "disabled", None)
    assert loop.limits.max_positions is None and loop.limits.vocab_size == 512


def test_explicit_limits_win_over_the_model_and_are_checked():
    model = build_model("llama", "cpu")
    with torch.inference_mode():
        loop = build_loop(model, "cpu", "disabled", None, vocab_size=100, max_positions=20)
        with pytest.raises(ValueError, match=r"token id 100, outside the vocabulary: the loop's vocab_size has ids 0 to 99"):
            loop.add("a", [100], 2)
        with pytest.raises(ValueError, match=r"positions 0 to 20 .*the loop's max_positions embeds positions 0 to 19"):
            loop.add("b", [5] * 20, 2)
        with pytest.raises(ValueError, match="vocab_size must be a positive integer"):
            GenerationLoop(loop.decode, loop.prefill, loop.kv_cache, vocab_size=0)


@pytest.mark.parametrize(
    "request_id,prompt,max_new_tokens,error,match",
    [
        ("a", torch.tensor([5.0, 6.0]), 4, TypeError, r"request 'a': prompt is a Tensor of torch.float32; token ids are integers"),
        ("a", "123", 4, TypeError, r"request 'a': prompt is a str, not token ids: tokenize the text first"),
        ("a", [5, 6.0], 4, TypeError, r"request 'a': prompt\[1\] is 6.0 \(float\); token ids are integers"),
        ("a", [True, 5], 4, TypeError, r"request 'a': prompt\[0\] is True \(bool\)"),
        ("a", torch.tensor([True, False]), 4, TypeError, r"prompt is a Tensor of torch.bool"),
        ("a", [[5, 6]], 4, TypeError, r"request 'a': prompt\[0\] is \[5, 6\] \(list\)"),
        ("a", torch.tensor([[5, 6]]), 4, ValueError, r"request 'a': prompt is a 2-D Tensor of shape \(1, 2\); pass one request's ids, 1-D"),
        ("a", {5, 6}, 4, TypeError, r"prompt is a set; token ids come in order"),
        ("a", 5, 4, TypeError, r"request 'a': prompt must be a sequence of token ids .*got int"),
        ("a", [5, 6], 2.5, TypeError, r"request 'a': max_new_tokens must be an integer, got 2.5 \(float\)"),
        ("a", [5, 6], True, TypeError, r"max_new_tokens must be an integer, got True \(bool\)"),
        ("a", [5, 6], "4", TypeError, r"max_new_tokens must be an integer, got '4' \(str\)"),
        ("a", [5, 6], 0, ValueError, r"request 'a': max_new_tokens must be at least 1, got 0"),
        (["a"], [5, 6], 4, TypeError, r"request_id must be hashable .*got list \['a'\]"),
    ],
    ids=[
        "float-tensor", "digit-string", "float-in-list", "bool-in-list", "bool-tensor", "nested-list", "2d-tensor", "set",
        "an-int", "fractional-max-new-tokens", "bool-max-new-tokens", "string-max-new-tokens", "zero-max-new-tokens",
        "unhashable-id",
    ],
)
def test_add_refuses_arguments_of_the_wrong_kind_naming_the_request_and_the_argument(request_id, prompt, max_new_tokens, error, match):
    with torch.inference_mode():
        loop = build_loop(build_model("llama", "cpu"), "cpu", "disabled", None)
        with pytest.raises(error, match=match):
            loop.add(request_id, prompt, max_new_tokens)
        assert loop.idle
        loop.add("a", [5, 6], 2)  # the id was not taken by the refused request
        while not loop.idle:
            loop.step()


def test_add_takes_token_ids_as_a_user_would_pass_them():
    numpy = pytest.importorskip("numpy")
    model = build_model("llama", "cpu")
    text = prompts(2)[1]
    expected = generated_by_transformers(model, text, 4)
    forms = [
        tuple(text), torch.tensor(text), torch.tensor(text, dtype=torch.int32), numpy.array(text, dtype=numpy.int64),
        numpy.array(text, dtype=numpy.uint16), [numpy.int64(token) for token in text], list(torch.tensor(text)),
    ]
    with torch.inference_mode():
        loop = build_loop(model, "cpu", "disabled", None)
        assert loop.generate(forms, numpy.int64(4)) == [expected] * len(forms)


def test_generate_with_a_refused_prompt_leaves_the_loop_as_it_found_it():
    with torch.inference_mode():
        loop = build_loop(build_model("llama", "cpu"), "cpu", "disabled", None)
        with pytest.raises(ValueError, match=r"request 1: prompt\[0\] is token id 9999"):
            loop.generate([[5, 6], [9999]], 2)
        assert loop.idle
        assert len(loop.generate([[5, 6]], 2)[0]) == 2


POISON = 7  # a token id whose embedding, in the tests below, raises as a model's own error would


def raise_on_poison(model: torch.nn.Module, when=lambda ids: bool((ids == POISON).any())):
    def hook(module, args):
        if when(args[0]):
            raise RuntimeError(f"the model cannot embed token {POISON}")

    return model.get_input_embeddings().register_forward_pre_hook(hook)


def test_a_request_whose_prefill_run_fails_is_dropped_and_named_and_the_others_go_on():
    """'bad' is prefilled alone and its run raises: 'bad' fails with the error, its blocks come back, and 'a'
    (decoding in the same step) and 'c' (added later) get exactly what they would get alone."""
    model = build_model("llama", "cpu")
    texts = [[token for token in prompt if token != POISON] for prompt in prompts(8)]
    expected_a = generated_by_transformers(model, texts[2], 12)
    expected_c = generated_by_transformers(model, texts[4], 6)
    raise_on_poison(model, when=lambda ids: ids.tolist() == [[5, POISON, 6]])  # 'bad''s prompt, prefilled alone
    with torch.inference_mode():
        loop = build_loop(model, "cpu", "disabled", None)
        free = loop.kv_cache.allocator.num_free
        loop.add("a", texts[2], 12)
        finished, failed = {}, {}
        for step in range(20):
            if step == 3:
                loop.add("bad", [5, POISON, 6], 4)
            if step == 5:
                loop.add("c", texts[4], 6)
            result = loop.step()
            finished.update(result)
            failed.update(result.failed)
            if step == 3:
                assert set(result.failed) == {"bad"} and loop.num_running == 1  # 'a' decoded in that step
        assert loop.idle
    assert finished == {"a": expected_a, "c": expected_c}
    error = failed["bad"]
    assert isinstance(error, RequestFailedError) and error.request_id == "bad" and error.phase == "prefill"
    assert "request 'bad' failed: the prefill run it was in raised RuntimeError: the model cannot embed token 7" in str(error)
    assert isinstance(error.__cause__, RuntimeError)
    assert loop.kv_cache.allocator.num_free == free  # every block back, the failed request's too


def test_a_failed_decode_run_fails_every_request_in_it_cleanly():
    """A run's error cannot be pinned on one of its requests (a device error fails them all): every request in
    the decode run fails, named with the others, blocks back, and the loop serves the next request."""
    model = build_model("llama", "cpu")
    calls = itertools.count()
    # The second run: the first step prefills both together, each takes its first token, then both decode.
    raise_on_poison(model, when=lambda ids: next(calls) == 1)
    with torch.inference_mode():
        loop = build_loop(model, "cpu", "disabled", None)
        free = loop.kv_cache.allocator.num_free
        loop.add("x", [5, 6, 8], 8)
        loop.add("y", [9, 10], 8)
        result = loop.step()
        assert set(result.failed) == {"x", "y"} and not result and loop.idle
        assert str(result.failed["x"]) == (
            "request 'x' failed: the decode run it was in raised RuntimeError: the model cannot embed token 7 "
            "(1 other request(s) of that run failed with it: 'y')"
        )
        assert loop.kv_cache.allocator.num_free == free
        assert len(loop.generate([[5, 6]], 3)[0]) == 3  # the loop still serves


def test_generate_raises_the_failure_once_the_other_requests_are_done():
    model = build_model("llama", "cpu")
    raise_on_poison(model)
    with torch.inference_mode():
        loop = build_loop(model, "cpu", "disabled", None, max_requests=1)
        with pytest.raises(RequestFailedError, match=r"request 1 failed: the prefill run"):
            loop.generate([[5, 6], [5, POISON], [8, 9]], 3)
        assert loop.idle and loop.kv_cache.allocator.num_free == loop.kv_cache.num_blocks - 1
