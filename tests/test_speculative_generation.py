"""Speculative decoding in the generation loop: greedy output equal to ``model.generate(do_sample=False)`` token
for token, for every mode, every k in 1..4, both drafters, 1 and 8 prompts of random lengths, in float32 on
cpu; a draft model identical to the target accepts every draft; acceptance and tokens identical with graphs and
eagerly; drafts never read after a replay rewrote them; requests joining, leaving, opting out and sampling
beside drafted ones; an end-of-sequence token or max_new_tokens inside an accepted run. On cuda, in float32 and
bfloat16, the output equals graphhal's own non-speculative greedy output, up to a near tie of the plain path's
two best logits where the outputs part (``NEAR_TIE``).

Cost: the tiny random Llama of ``support.transformers_models``; every mode at one k, every k in one mode (its
verify runners for k = 1..4 in one pool, beside the plain decode's).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import pytest
import torch

transformers = pytest.importorskip("transformers")

from graphhal.sampling import SamplingParams  # noqa: E402
from graphhal.speculative import DraftModelDrafter, PromptLookupDrafter, ReplayDrafter  # noqa: E402
from graphhal.transformers import GenerationLoop, decode_runner, draft_model_drafter, paged_kv_cache, prefill_runner  # noqa: E402
from runners import DecodeConfig, PrefillConfig  # noqa: E402
from support.transformers_models import (  # noqa: E402
    MODES,
    build_model,
    generated_by_transformers,
    prompts,
    skip_where_torch_cannot_compile_the_model,
)

NEW_TOKENS = 16
LENGTHS = (1, 5, 12, 40, 3, 70, 17, 8)  # eight random prompts: one token, a few, two longer than a prefill batch
_EXPECTED: dict[tuple, list[int]] = {}


def expected(prompt: list[int], new_tokens: int = NEW_TOKENS, **options) -> list[int]:
    key = (tuple(prompt), new_tokens, tuple(sorted(options.items())))
    if key not in _EXPECTED:
        _EXPECTED[key] = generated_by_transformers(reference_model(), prompt, new_tokens, **options)
    return _EXPECTED[key]


_REFERENCE: list = []


def reference_model():
    """The target's weights with transformers' own attention (the runners switch theirs to graphhal's)."""
    if not _REFERENCE:
        _REFERENCE.append(build_model("llama"))
    return _REFERENCE[0]


@dataclass
class Server:
    kv_cache: object
    prefill: object
    decode: object
    verify: dict
    drafter: DraftModelDrafter | None
    eos: object

    def loop(self, k: int, drafter=None, **options) -> GenerationLoop:
        return GenerationLoop(
            self.decode, self.prefill, self.kv_cache, drafter=drafter or self.drafter, verify=self.verify[k],
            num_draft_tokens=k, eos_token_ids=self.eos, **options,
        )

    def blocks_all_back(self) -> bool:
        caches = [self.kv_cache] + ([self.drafter.kv_cache] if self.drafter else [])
        return all(cache.allocator.num_free == cache.num_blocks - 1 for cache in caches)


def build_server(device: str, mode: str, ks=(2,), *, draft=None, draft_max_bs: int = 8, dtype=torch.float32, num_blocks: int = 96) -> Server:
    """As a server builds it: the target's prefill captured first, its decode and one verify runner per k (q = 1
    + k) into that pool, then the draft model's runners into it too."""
    skip_where_torch_cannot_compile_the_model(mode, None)
    torch._dynamo.reset()
    model = build_model("llama", device, dtype)
    kv_cache = paged_kv_cache(model, num_blocks=num_blocks, block_size=16, max_seq_len=256)
    prefill = prefill_runner(model, kv_cache, device, PrefillConfig(mode=mode, max_tokens=32, buckets=[16, 32], max_requests=8, show_progress=False))
    prefill.capture()
    decode = decode_runner(model, kv_cache, device, DecodeConfig(mode=mode, max_bs=8, buckets=[4, 8], show_progress=False), pool=prefill.pool)
    decode.capture()
    verify = {}
    for k in ks:
        config = DecodeConfig(mode=mode, max_bs=8, buckets=[4, 8], query_tokens=1 + k, show_progress=False)
        verify[k] = decode_runner(model, kv_cache, device, config, sampling=False, greedy_verify=True, pool=prefill.pool)
        verify[k].capture()
    drafter = None
    if draft is not None:
        drafter = draft_model_drafter(
            draft.to(device=device, dtype=dtype), device, like=kv_cache, pool=prefill.pool, mode=mode, max_bs=draft_max_bs,
            max_tokens=32, max_requests=8, show_progress=False,
        )
        drafter.capture()
    return Server(kv_cache, prefill, decode, verify, drafter, model.generation_config.eos_token_id)


class CheckedDrafts:
    """Wraps a drafter: keeps every drafts tensor it handed out beside a copy taken at once, so a test can see
    that no later replay (the verify step's, the next draft steps') rewrote memory the loop was handed."""

    def __init__(self, drafter) -> None:
        self.drafter, self.handed = drafter, []
        self.eager_steps = 0

    def propose(self, requests, k):
        drafts = self.drafter.propose(requests, k)
        self.handed.append((drafts, drafts.clone()))
        return drafts

    def release(self, request_id):
        self.drafter.release(request_id)

    def untouched(self) -> bool:
        return bool(self.handed) and all(torch.equal(drafts, copy) for drafts, copy in self.handed)


@pytest.mark.parametrize("mode", MODES)
def test_speculative_greedy_generation_equals_generate_in_every_mode(mode):
    """k = 2: a draft model identical to the target (every draft accepted) on 8 prompts, prompt lookup on 1 (on 8
    in every k's test)."""
    texts = prompts(LENGTHS)
    with torch.inference_mode():
        server = build_server("cpu", mode, draft=build_model("llama"))
        checked = CheckedDrafts(server.drafter)
        loop = server.loop(2, checked)
        assert loop.generate(texts, NEW_TOKENS) == [expected(t) for t in texts]
        assert loop.speculation.acceptance_rate == 1.0 and loop.speculation.verify_steps > 0
        assert checked.untouched()
        if mode == "disabled":  # every step eager, and visible as such
            assert server.drafter.eager_steps > 0 and loop.speculation.eager_verify_steps == loop.speculation.verify_steps
        else:
            assert server.drafter.eager_steps == 0 and loop.speculation.eager_verify_steps == 0
        lookup = server.loop(2, PromptLookupDrafter())
        assert lookup.generate(texts[3:4], NEW_TOKENS) == [expected(texts[3])]
        assert lookup.speculation.verify_steps > 0
    assert server.blocks_all_back()


def test_every_k_from_1_to_4_in_one_pool_equals_generate(caplog):
    """Verify runners for k = 1..4 and the plain decode share one pool with the draft model's graphs; every k
    with both drafters gives generate's tokens, an identical draft model exactly k + 1 tokens per verify step.
    The draft decode graphs hold 4 requests, so its steps of 5 to 8 run eagerly: counted, and logged once."""
    texts = prompts(LENGTHS)
    with torch.inference_mode():
        server = build_server("cpu", "full", ks=(1, 2, 3, 4), draft=build_model("llama"), draft_max_bs=4)
        pools = {runner.pool for runner in (server.prefill, server.decode, *server.verify.values(), server.drafter.decode, server.drafter.prefill)}
        assert len(pools) == 1
        for k in (1, 2, 3, 4):
            with caplog.at_level(logging.WARNING, logger="graphhal.speculative.draft_model"):
                loop = server.loop(k)
                assert loop.generate(texts, NEW_TOKENS) == [expected(t) for t in texts], k
            assert loop.speculation.accepted == loop.speculation.drafted > 0  # k + 1 tokens every verify step
            lookup = server.loop(k, PromptLookupDrafter())
            some = texts if k in (1, 4) else texts[5:6]  # 8 prompts, or 1
            assert lookup.generate(some, NEW_TOKENS) == [expected(t) for t in some], k
    assert server.drafter.eager_steps > 0
    assert len([r for r in caplog.records if "ran a step eagerly" in r.message]) == 1
    assert server.blocks_all_back()


def perturbed_target():
    """The target's weights plus seeded noise: a draft model whose drafts are accepted about a third of the time."""
    model = build_model("llama")
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.01)
    return model


def stepped(loop: GenerationLoop, texts: list[list[int]]) -> list[dict]:
    for index, text in enumerate(texts):
        loop.add(index, text, NEW_TOKENS)
    steps = []
    while not loop.idle:
        steps.append(loop.step().tokens)
    return steps


def test_acceptance_and_every_token_are_the_same_with_graphs_and_eagerly():
    """The replay drafter (seeded) proposes the same drafts with graphs and eagerly: every step hands out the
    same tokens, and the same drafts are accepted. A draft model of perturbed weights accepts about a third:
    its output is generate's both ways and its acceptance the same within a few drafts (its first-draft step
    runs padded to a prefill bucket under graphs, unpadded eagerly: matmuls of other shapes round differently,
    and a near tie of the perturbed model's top two tokens may go the other way; the vLLM bug of 0 % against
    92 % is what this bound catches)."""
    texts = prompts(LENGTHS)
    recorded = {i: t + expected(t) for i, t in enumerate(texts)}
    replayed, drafted = {}, {}
    with torch.inference_mode():
        for mode in ("full", "disabled"):
            server = build_server("cpu", mode, ks=(3,), draft=perturbed_target())
            replay_loop = server.loop(3, ReplayDrafter(recorded, 0.6, 512, seed=1))
            replayed[mode] = (stepped(replay_loop, texts), replay_loop.speculation.accepted)
            assert 0 < replay_loop.speculation.acceptance_rate < 1
            model_loop = server.loop(3)
            assert model_loop.generate(texts, NEW_TOKENS) == [expected(t) for t in texts]
            drafted[mode] = model_loop.speculation.acceptance_rate
    assert replayed["full"] == replayed["disabled"]
    assert 0.15 < drafted["full"] < 0.6 and abs(drafted["full"] - drafted["disabled"]) < 0.05
    finished = {}
    for tokens in replayed["full"][0]:
        for request, new in tokens.items():
            finished.setdefault(request, []).extend(new)
    assert [finished[i] for i in range(len(texts))] == [expected(t) for t in texts]


def test_requests_join_leave_opt_out_and_sample_beside_drafted_ones():
    """Requests arrive at different steps, wait for blocks and places (at most 3 run, 2 a prefill batch), one
    opts out of drafts, one samples (it runs without drafts), one is aborted: every greedy one gets generate's
    tokens, the sampled one what a loop without a drafter gives it, and every block of both caches is back."""
    texts = prompts(LENGTHS)
    budgets = [16, 7, 14, 3, 16, 12, 1, 15]
    arrivals = {0: [0, 1, 2], 2: [3], 3: [4, 5], 9: [6], 12: [7]}
    sampled = SamplingParams(temperature=0.8, top_k=20, seed=11)
    with torch.inference_mode():
        server = build_server("cpu", "full", ks=(3,), draft=build_model("llama"))
        plain = GenerationLoop(server.decode, server.prefill, server.kv_cache, eos_token_ids=server.eos)
        plain.add("s", texts[5], budgets[5], sampling=sampled)
        want_sampled = None
        while not plain.idle:
            want_sampled = plain.step().get("s", want_sampled)
        loop = server.loop(3, max_running=3)
        loop.kv_cache.allocator.allocate(96 - 1 - 9)  # 9 blocks left to the loop
        finished, step, aborted = {}, 0, False
        while step <= max(arrivals) or not loop.idle:
            for request in arrivals.get(step, []):
                options = {"speculative": False} if request == 2 else {"sampling": sampled} if request == 5 else {}
                loop.add(request, texts[request], budgets[request], **options)
            finished.update(loop.step())
            if step == 4:
                aborted = loop.abort(4)
            step += 1
        loop.kv_cache.allocator.free(list(range(1, 96 - 9)))
    assert aborted and 4 not in finished
    assert finished.pop(5) == want_sampled
    assert finished == {i: expected(texts[i], budgets[i]) for i in (0, 1, 2, 3, 6, 7)}
    assert loop.speculation.acceptance_rate == 1.0
    assert server.blocks_all_back()


def test_an_end_inside_an_accepted_run_stops_exactly_there():
    """k = 4 and every draft accepted, so tokens come five a step: an end-of-sequence token, max_new_tokens or the
    end of a stop sequence falling inside a run ends the request at that token; drafts past the request's blocks
    write the null slot. A request asking for log-probabilities runs without drafts beside it."""
    text = prompts(LENGTHS)[2]  # 12 tokens
    with torch.inference_mode():
        server = build_server("cpu", "full", ks=(4,), draft=build_model("llama"))
        greedy = expected(text, NEW_TOKENS, eos_token_id=None)
        eos = greedy[5]  # the request feeds token 1 plainly, then runs of five: 2..6, 7..11
        assert eos not in greedy[:5]
        loop = server.loop(4)
        loop.eos_token_ids = frozenset({eos})
        assert loop.generate([text], NEW_TOKENS) == [greedy[:6]]
        loop.eos_token_ids = frozenset()
        for budget in (3, 5, 9):  # inside the first run, at a block's end (12 + 5 - 1 = 16 cached), inside the second
            assert loop.generate([text], budget) == [greedy[:budget]]
        loop.add("stop", text, NEW_TOKENS, stop=[greedy[3:5]])  # a stop sequence ending inside the first run
        loop.add("logprobs", text, 8, logprobs=True)  # log-probabilities: the plain step, no drafts
        finished, logprobs = {}, []
        while not loop.idle:
            result = loop.step()
            finished.update(result)
            logprobs += result.logprobs.get("logprobs", [])
        assert finished == {"stop": greedy[:5], "logprobs": greedy[:8]} and len(logprobs) == 8
    assert server.blocks_all_back()


def test_what_a_speculative_loop_refuses():
    with torch.inference_mode():
        server = build_server("cpu", "disabled", ks=(2,))
        with pytest.raises(ValueError, match="overlap must be False"):
            server.loop(2, PromptLookupDrafter(), overlap=True)
        with pytest.raises(ValueError, match="overlap must be False"):  # nor switched on later: drafts would fade out
            server.loop(2, PromptLookupDrafter()).overlap = True
        with pytest.raises(ValueError, match=r"num_draft_tokens=3 verifies 1 \+ 3 tokens .*DecodeConfig\(query_tokens=4\).*query_tokens=3"):
            GenerationLoop(server.decode, server.prefill, server.kv_cache, drafter=PromptLookupDrafter(), verify=server.verify[2], num_draft_tokens=3)
        with pytest.raises(TypeError, match="drafter must have propose"):
            GenerationLoop(server.decode, server.prefill, server.kv_cache, drafter=object(), verify=server.verify[2], num_draft_tokens=2)

        logits_runner = decode_runner(
            server.verify[2].forward.forward_step.model, server.kv_cache, "cpu", DecodeConfig(mode="disabled", max_bs=8, query_tokens=3, show_progress=False),
            sampling=False,
        )
        with pytest.raises(TypeError, match=r"greedy-verify step .*got a step of DecodeStep.*DecodeConfig\(query_tokens=3\), sampling=False, greedy_verify=True"):
            GenerationLoop(server.decode, server.prefill, server.kv_cache, drafter=PromptLookupDrafter(), verify=logits_runner, num_draft_tokens=2)
        other_cache = paged_kv_cache(server.verify[2].forward.forward_step.model, num_blocks=8, block_size=32, max_seq_len=256)
        elsewhere = decode_runner(
            server.verify[2].forward.forward_step.model, other_cache, "cpu", DecodeConfig(mode="disabled", max_bs=8, query_tokens=3, show_progress=False),
            sampling=False, greedy_verify=True,
        )
        with pytest.raises(ValueError, match="verify runner's KV cache has blocks of 32 tokens .* the loop's 16"):
            GenerationLoop(server.decode, server.prefill, server.kv_cache, drafter=PromptLookupDrafter(), verify=elsewhere, num_draft_tokens=2)
    assert server.blocks_all_back()


class Failing(PromptLookupDrafter):
    """Prompt lookup that raises at some proposes (``fails(call)``), or hands back drafts of the wrong shape."""

    def __init__(self, fails, short: bool = False) -> None:
        super().__init__()
        self.fails, self.short, self.calls, self.released = fails, short, 0, []

    def propose(self, requests, k):
        self.calls += 1
        if self.fails(self.calls):
            raise RuntimeError(f"drafter broke at call {self.calls}")
        drafts = super().propose(requests, k)
        return drafts[:, :1] if self.short else drafts

    def release(self, request_id):
        self.released.append(request_id)


def test_a_drafter_that_raises_costs_drafts_not_requests(caplog):
    """Drafting is an optimisation: a drafter raising (every other step, or always; or drafts of the wrong
    shape) leaves every request of its steps with generate's tokens, verified without drafts; such steps are
    counted and the first logged with the exception, and the drafter is told to forget the requests."""
    texts = prompts(LENGTHS)[:4]
    with torch.inference_mode():
        server = build_server("cpu", "disabled", ks=(2,))
        for drafter in (Failing(lambda call: call % 2 == 0), Failing(lambda call: True), Failing(lambda call: False, short=True)):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="graphhal.transformers.speculative_step"):
                loop = server.loop(2, drafter)
                assert loop.generate(texts, NEW_TOKENS) == [expected(t) for t in texts]
            assert loop.speculation.drafter_failures > 0 and loop.speculation.verify_steps > 0
            logged = [r for r in caplog.records if "verified without drafts" in r.getMessage()]
            assert len(logged) == 1 and logged[0].exc_info is not None
            assert re.search(r"returned \((\d), 1\); expected an int64 tensor of \(\1, 2\)" if drafter.short else "drafter broke at call", logged[0].getMessage())
            assert set(drafter.released) == set(range(len(texts)))
    assert server.blocks_all_back()


def test_a_request_with_one_token_left_gets_no_drafts():
    """No draft of a request's last token could be kept: that step is the plain one-token decode."""
    asked = []

    class Recording(PromptLookupDrafter):
        def propose(self, requests, k):
            asked.extend((r.max_len - len(r.tokens)) for r in requests)
            return super().propose(requests, k)

    texts = prompts(LENGTHS)[:3]
    with torch.inference_mode():
        server = build_server("cpu", "disabled", ks=(2,))
        loop = server.loop(2, Recording())
        for index, budget in enumerate((2, 3, 7)):
            loop.add(index, texts[index], budget)
        finished = {}
        while not loop.idle:
            finished.update(loop.step())
    assert finished == {i: expected(texts[i], budget) for i, budget in enumerate((2, 3, 7))}
    assert asked and min(asked) >= 2  # every request asked for drafts had at least two tokens to generate


def test_a_verify_rows_cache_slots_follow_its_blocks_and_go_to_the_null_slot_past_them():
    """The verify step's slots, built a block's run at a time, are the per-position slots: within a block,
    across a block boundary, and the null slot for drafts past the request's last block (never kept)."""
    from graphhal.paged_attention.kv_cache import NULL_SLOT
    from graphhal.transformers.loop_requests import Request

    server = build_server("cpu", "disabled", ks=(2,))
    batches = server.loop(2, PromptLookupDrafter()).batches
    request = Request("r", [5] * 20, 8, SamplingParams.greedy(), blocks=[5, 9])
    size = batches.block_size

    def one_at_a_time(start, count):
        return [batches.slot(request, p) if p // size < len(request.blocks) else NULL_SLOT for p in range(start, start + count)]

    for start in range(0, 2 * size + 3):
        for count in range(1, size + 3):
            assert batches.slots_or_null(request, start, count) == one_at_a_time(start, count), (start, count)
    assert batches.slots_or_null(request, size - 2, 4) == [5 * size + size - 2, 5 * size + size - 1, 9 * size, 9 * size + 1]
    assert batches.slots_or_null(request, 2 * size - 1, 3) == [9 * size + size - 1, NULL_SLOT, NULL_SLOT]


def test_every_request_the_target_admits_has_room_in_the_draft_cache():
    """The draft cache, sized like the target's (``like=``), takes what the target takes per request
    (``prompt + max_new_tokens - 1`` tokens: the last is never fed): a request of exactly the longest the cache
    serves, and two that take every block between them, run to generate's tokens beside the others."""
    cases = [(32, {"short": (10, 8), "long": (10, 55)}), (5, {"a": (10, 23), "b": (10, 23)})]  # 10 + 55 - 1 = 64
    with torch.inference_mode():
        for num_blocks, requests in cases:
            model = build_model("llama")
            kv_cache = paged_kv_cache(model, num_blocks=num_blocks, block_size=16, max_seq_len=64)
            prefill = prefill_runner(model, kv_cache, "cpu", PrefillConfig(mode="disabled", max_tokens=32, max_requests=4, show_progress=False))
            decode = decode_runner(model, kv_cache, "cpu", DecodeConfig(mode="disabled", max_bs=4, show_progress=False))
            config = DecodeConfig(mode="disabled", max_bs=4, query_tokens=3, show_progress=False)
            verify = decode_runner(model, kv_cache, "cpu", config, sampling=False, greedy_verify=True)
            drafter = draft_model_drafter(build_model("llama"), "cpu", like=kv_cache, mode="disabled", max_bs=4, max_tokens=32, max_requests=4, show_progress=False)
            loop = GenerationLoop(decode, prefill, kv_cache, drafter=drafter, verify=verify, num_draft_tokens=2)
            texts = {name: prompts((length,))[0] for name, (length, _) in requests.items()}
            for name, (_, budget) in requests.items():
                loop.add(name, texts[name], budget)
            finished, failed = {}, {}
            while not loop.idle:
                result = loop.step()
                finished.update(result)
                failed.update(result.failed)
            assert not failed
            assert finished == {name: expected(texts[name], budget, eos_token_id=None) for name, (_, budget) in requests.items()}
            assert loop.speculation.acceptance_rate == 1.0
            assert drafter.kv_cache.allocator.num_free == num_blocks - 1


# --- cuda: equal to graphhal's own greedy output without drafts, up to near ties ------------------------------

# A step of 1 + k tokens and k + 1 steps of one token reduce in other orders: where the plain path's two best
# logits are this close (relative to the best; bfloat16: 8 of its roundings, 2 ** -8 each), the speculative
# path may take the other one.
NEAR_TIE = {torch.float32: 1e-4, torch.bfloat16: 8 * 2**-8}


def equal_up_to_a_near_tie(model, prompt: list[int], got: list[int], want: list[int], dtype: torch.dtype) -> bool:
    """``got == want``, or they part where the target's two best logits after ``prompt + want[:i]`` are within
    ``NEAR_TIE`` and ``got`` took the other of the two (what follows the parting is not compared)."""
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            ids = torch.tensor([prompt + want[:i]], device=model.device)
            top = model(ids, attention_mask=torch.ones_like(ids)).logits[0, -1].float().topk(2)
            best, second = top.values.tolist()
            return best - second <= NEAR_TIE[dtype] * max(1.0, abs(best)) and a in top.indices.tolist()
    return got == want


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["full", "auto"])
def test_speculative_on_cuda_equals_graphhals_plain_greedy(mode, dtype):
    texts = prompts(LENGTHS)
    with torch.inference_mode():
        server = build_server("cuda", mode, ks=(1, 2, 3, 4), draft=build_model("llama"), dtype=dtype)
        target = build_model("llama", "cuda", dtype)  # the same weights with transformers' attention: the margins
        plain = GenerationLoop(server.decode, server.prefill, server.kv_cache, eos_token_ids=server.eos)
        want = plain.generate(texts, NEW_TOKENS)

        def matches(outputs, some=texts):
            return all(equal_up_to_a_near_tie(target, t, g, w, dtype) for t, g, w in zip(some, outputs, want))

        for k in (1, 2, 3, 4):
            loop = server.loop(k)
            assert matches(loop.generate(texts, NEW_TOKENS)), k
            # The draft's one-token steps and the verify step's 1 + k round differently: a near tie may reject
            # a draft of the identical model now and then.
            assert loop.speculation.acceptance_rate > 0.9 and server.drafter.eager_steps == 0
            assert matches(server.loop(k, PromptLookupDrafter()).generate(texts, NEW_TOKENS)), k
            assert matches(server.loop(k, PromptLookupDrafter()).generate(texts[:1], NEW_TOKENS), texts[:1]), k
    assert server.blocks_all_back()
