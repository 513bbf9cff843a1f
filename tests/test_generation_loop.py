"""The generation loop as a server runs it: overlapped steps, sampling on the device, streaming, aborts, stop
sequences and the model's generation_config defaults.

A tiny random Llama in float32 (no download), on the loop's runners built by ``graphhal.transformers``. Greedy
output is pinned against ``model.generate(do_sample=False)``; sampled output against the same loop run
eagerly, synchronously, and again: one seed, the same tokens.
"""

from __future__ import annotations

import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")  # before the integration, which imports it

from graphhal.sampling import SamplingParams  # noqa: E402
from graphhal.transformers import GenerationLoop, decode_runner, paged_kv_cache, prefill_runner  # noqa: E402
from runners import DecodeConfig, PrefillConfig  # noqa: E402
from support.transformers_models import skip_where_torch_cannot_compile_the_model  # noqa: E402

NEW_TOKENS = 12
PROMPT_LENGTHS = [5, 40, 1, 17]  # one longer than the 32-token prefill bucket: prefilled in two chunks


def tiny_llama(device: str = "cpu") -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval().to(device)


def prompts(count: int = len(PROMPT_LENGTHS)) -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(3, 256, (PROMPT_LENGTHS[i],), generator=generator).tolist() for i in range(count)]


def runners_of(model, mode: str = "full", device: str = "cpu", **sampler) -> tuple:
    skip_where_torch_cannot_compile_the_model(mode, None)  # piecewise compiles the model: not on torch 2.6
    torch._dynamo.reset()
    kv_cache = paged_kv_cache(model, num_blocks=64, block_size=16, max_seq_len=128)
    config = PrefillConfig(mode=mode, max_tokens=32, max_requests=4, show_progress=False)
    prefill = prefill_runner(model, kv_cache, device, config, **sampler)
    prefill.capture()
    decode = decode_runner(model, kv_cache, device, DecodeConfig(mode=mode, max_bs=4, show_progress=False), pool=prefill.pool, **sampler)
    decode.capture()
    return decode, prefill, kv_cache


def loop_of(model, mode: str = "full", device: str = "cpu", **options) -> GenerationLoop:
    return GenerationLoop(*runners_of(model, mode, device), **options)


def run_requests(loop: GenerationLoop, requests: dict, overlap_by_step: list[bool] | None = None) -> dict:
    """Add ``{id: (prompt, sampling)}`` and step until idle (``loop.overlap`` set before each step from
    ``overlap_by_step``, cycled); every request's output, checked against what was streamed."""
    for request_id, (prompt, sampling) in requests.items():
        loop.add(request_id, prompt, NEW_TOKENS, sampling=sampling)
    outputs, streamed = {}, {}
    for step in range(100):  # ends long before: a loop that lost a token would never go idle
        if loop.idle:
            break
        if overlap_by_step:
            loop.overlap = overlap_by_step[step % len(overlap_by_step)]
        result = loop.step()
        outputs.update(result)
        for request_id, tokens in result.tokens.items():
            streamed.setdefault(request_id, []).extend(tokens)
    assert loop.idle and streamed == outputs and set(outputs) == set(requests)
    return outputs


def transformers_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' own greedy generation, with its own attention (switched back to graphhal's after)."""
    switched = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        ids = torch.tensor([prompt], device=model.device)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    finally:
        model.set_attn_implementation(switched)
    return out[0, len(prompt):].tolist()


SAMPLED = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, min_p=0.01, seed=1234)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.mark.cpu
@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "synchronous"])
def test_greedy_generation_equals_transformers_generate(model, overlap):
    with torch.inference_mode():
        got = loop_of(model, overlap=overlap).generate(prompts(), NEW_TOKENS)
    assert got == [transformers_greedy(model, prompt, NEW_TOKENS) for prompt in prompts()]


@pytest.mark.cpu
@pytest.mark.parametrize("mode", ["full", "breakable", "piecewise"])
def test_sampled_tokens_are_the_same_with_graphs_eagerly_overlapped_or_not_and_run_after_run(model, mode):
    def sampled(mode: str, overlap: bool) -> list[list[int]]:
        with torch.inference_mode():
            loop = loop_of(model, mode, overlap=overlap)
            return loop.generate(prompts(), NEW_TOKENS, sampling=SAMPLED)

    reference = sampled("disabled", overlap=False)
    assert sampled(mode, overlap=True) == reference
    assert sampled(mode, overlap=True) == reference  # run after run
    assert reference != [transformers_greedy(model, p, NEW_TOKENS) for p in prompts()]  # it did sample


def seeded_requests() -> dict:
    """Every prompt with a sampling of its own seed."""
    return {i: (prompt, SamplingParams(temperature=0.9, top_k=40, top_p=0.95, min_p=0.01, seed=100 + i)) for i, prompt in enumerate(prompts())}


@pytest.mark.cpu
def test_a_requests_tokens_do_not_depend_on_what_else_is_in_its_batch_nor_on_its_row(model):
    requests = seeded_requests()
    last = len(requests) - 1
    with torch.inference_mode():
        loop = loop_of(model)
        alone = run_requests(loop, {last: requests[last]})[last]  # row 0 of every batch
        together = run_requests(loop, requests)  # prefilled in a later step, then row 3 of the decode batches
    assert together[last] == alone
    assert len({tuple(tokens) for tokens in together.values()}) == len(requests)  # their own seeds, their own draws


@pytest.mark.cpu
def test_explicit_sampling_without_a_seed_gives_each_request_a_seed_of_its_own_from_the_loops_seed(model):
    same = [prompts(1)[0]] * 3
    with torch.inference_mode():
        loop = loop_of(model, "disabled", seed=5)
        first = loop.generate(same, NEW_TOKENS, sampling=SamplingParams(temperature=1.0))
        seeded = loop.generate(same, NEW_TOKENS, sampling=SamplingParams(temperature=1.0, seed=9))
        again = loop_of(model, "disabled", seed=5).generate(same, NEW_TOKENS, sampling=SamplingParams(temperature=1.0))
    assert len({tuple(tokens) for tokens in first}) == 3  # identical requests, three seeds, three draws
    assert again == first  # the same loop seed: the same seeds, the same tokens
    assert seeded[0] == seeded[1] == seeded[2]  # one explicit seed: one draw


@pytest.mark.cpu
def test_overlap_switched_between_steps_both_ways_hands_out_every_token_in_order(model):
    with torch.inference_mode():
        loop = loop_of(model)
        expected = run_requests(loop, seeded_requests())
        switched = run_requests(loop, seeded_requests(), overlap_by_step=[True, True, False, False, True, False])
    assert switched == expected


@pytest.mark.cpu
def test_streamed_tokens_add_up_to_the_output_and_arrive_one_step_late_when_overlapped(model):
    with torch.inference_mode():
        loop = loop_of(model)
        loop.add("a", prompts(1)[0], NEW_TOKENS)
        streamed, finished, steps = [], None, []
        while not loop.idle:
            result = loop.step()
            steps.append(len(result.tokens.get("a", [])))
            streamed += result.tokens.get("a", [])
            finished = result.get("a", finished)
    assert streamed == finished and len(finished) == NEW_TOKENS
    # Step 1 prefills and decodes (two tokens sampled, none read); each later step reads the previous one's.
    assert steps[0] == 0 and steps[1] == 2 and steps[-1] == 1


@pytest.mark.cpu
def test_an_aborted_request_gives_its_blocks_back_and_the_others_go_on(model):
    with torch.inference_mode():
        loop = loop_of(model)
        free = loop.kv_cache.allocator.num_free
        expected = loop.generate(prompts(2), NEW_TOKENS, sampling=SAMPLED)
        loop.add(0, prompts(2)[0], NEW_TOKENS, sampling=SAMPLED)
        loop.add(1, prompts(2)[1], NEW_TOKENS, sampling=SAMPLED)
        outputs, seen_1 = {}, []
        for _ in range(3):
            result = loop.step()
            outputs.update(result)
            seen_1 += result.tokens.get(1, [])
        assert loop.abort(1) and not loop.abort(1) and not loop.abort("never added")
        while not loop.idle:
            result = loop.step()
            assert 1 not in result.tokens and 1 not in result  # nothing of it is handed out after the abort
            outputs.update(result)
    assert outputs == {0: expected[0]} and seen_1 == expected[1][: len(seen_1)]
    assert loop.kv_cache.allocator.num_free == free


@pytest.mark.cpu
def test_a_queued_request_is_aborted_alone_whatever_its_id(model):
    with torch.inference_mode():
        loop = loop_of(model, "disabled", max_running=1)
        for request_id in ("a", None, "c"):
            loop.add(request_id, prompts(1)[0], 2)
        loop.step()  # 'a' admitted, the others queued behind it
        assert loop.num_waiting == 2 and loop.abort(None) and loop.num_waiting == 1
        outputs = {}
        while not loop.idle:
            outputs.update(loop.step())
    assert set(outputs) == {"a", "c"}


@pytest.mark.cpu
def test_a_stop_sequence_ends_a_request_right_after_it(model):
    with torch.inference_mode():
        loop = loop_of(model)
        full = loop.generate(prompts(1), NEW_TOKENS)[0]
        stop = full[4:6]
        loop.add("s", prompts(1)[0], NEW_TOKENS, stop=[[999_999], stop])  # a sequence never produced, then ours
        output = None
        while not loop.idle:
            output = loop.step().get("s", output)
    first = next(i for i in range(len(full) - 1) if full[i:i + 2] == stop)
    assert output == full[: first + 2]


@pytest.mark.cpu
def test_eos_and_sampling_defaults_come_from_the_models_generation_config(model):
    with torch.inference_mode():
        greedy = loop_of(model).generate(prompts(1), NEW_TOKENS)[0]
        model.generation_config.eos_token_id = greedy[3]
        assert loop_of(model).generate(prompts(1), NEW_TOKENS)[0] == greedy[:4]  # stops at the model's eos
        model.generation_config.eos_token_id = None
        config = model.generation_config
        saved = (config.do_sample, config.temperature, config.top_k)
        config.do_sample, config.temperature, config.top_k = True, 1.5, 20
        try:
            loop = loop_of(model, seed=3)
            assert loop.default_sampling == {"temperature": 1.5, "top_k": 20, "top_p": 1.0, "min_p": 0.0}
            sampled = loop.generate(prompts(1), NEW_TOKENS)[0]
            again = loop_of(model, seed=3).generate(prompts(1), NEW_TOKENS)[0]
        finally:
            config.do_sample, config.temperature, config.top_k = saved
    assert sampled != greedy and sampled == again  # sampled as configured, reproducibly with the loop's seed


@pytest.mark.cpu
def test_sampling_defaults_fill_an_unset_top_k_as_generate_does_and_name_the_fields_the_loop_does_not_apply(model, caplog):
    config = transformers.GenerationConfig(do_sample=True, repetition_penalty=1.2)  # top_k unset
    with caplog.at_level(logging.WARNING, logger="graphhal.transformers.loop_defaults"):
        loop = loop_of(model, "disabled", generation_config=config)
    assert loop.default_sampling == {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": 0.0}
    warnings = [record.getMessage() for record in caplog.records if "does not apply" in record.getMessage()]
    assert len(warnings) == 1 and "repetition_penalty=1.2" in warnings[0]


@pytest.mark.cpu
def test_a_default_top_k_over_the_runners_max_top_k_is_refused_when_the_loop_is_built(model):
    runners = runners_of(model, "disabled", max_top_k=16)
    message = r"generation_config\.top_k \(unset, so generate's default: 50\) is more than the runners' max_top_k \(16\).*max_top_k >= 50"
    with pytest.raises(ValueError, match=message):
        GenerationLoop(*runners, generation_config=transformers.GenerationConfig(do_sample=True))
    loop = GenerationLoop(*runners, generation_config=transformers.GenerationConfig(do_sample=True, top_k=8))
    assert loop.default_sampling["top_k"] == 8


@pytest.mark.cpu
def test_logprobs_are_each_tokens_log_probability_under_the_model(model):
    with torch.inference_mode():
        loop = loop_of(model, "disabled")
        loop.add("p", prompts(1)[0], 4, sampling=SAMPLED, logprobs=True)
        tokens, logprobs = [], []
        while not loop.idle:
            result = loop.step()
            tokens += result.tokens.get("p", [])
            logprobs += result.logprobs.get("p", [])
        ids = torch.tensor([prompts(1)[0] + tokens])
        model.set_attn_implementation("sdpa")
        try:
            log_softmax = model(ids).logits[0].log_softmax(-1)
        finally:
            model.set_attn_implementation("graphhal")
    positions = range(len(prompts(1)[0]) - 1, ids.shape[1] - 1)
    expected = [log_softmax[p, token].item() for p, token in zip(positions, tokens)]
    assert logprobs == pytest.approx(expected, abs=1e-4)


@pytest.mark.cpu
@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"sampling": SamplingParams(top_k=10_000)}, ValueError, r"request 'x': sampling: top_k must be in 0\.\.256"),
        ({"sampling": {"temperature": 0.5}}, TypeError, r"request 'x': sampling must be a graphhal.sampling.SamplingParams"),
        ({"stop": [13]}, TypeError, r"request 'x': stop\[0\] is 13; each stop is a sequence of token ids"),
        ({"stop": "end"}, TypeError, r"request 'x': stop must be a list of token-id sequences"),
    ],
)
def test_requests_the_loop_cannot_serve_are_refused_naming_the_argument(model, options, error, message):
    loop = loop_of(model, "disabled")
    with pytest.raises(error, match=message):
        loop.add("x", [1, 2, 3], 4, **options)
    assert loop.idle
