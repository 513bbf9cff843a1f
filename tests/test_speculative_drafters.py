"""The drafters of ``graphhal.speculative``: prompt lookup proposes what transformers' prompt lookup proposes;
the replay drafter corrupts at its rate, seeded; the draft model drafter's drafts are the draft model's own
greedy tokens after any pattern of accepted drafts (its cache catching up), the same with graphs and eagerly,
its outputs memory of its own, and an eager step counted and logged.
"""

from __future__ import annotations

import logging
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from graphhal.speculative import DraftModelDrafter, DraftRequest, Drafter, PromptLookupDrafter, ReplayDrafter  # noqa: E402
from graphhal.transformers import draft_model_drafter, paged_kv_cache  # noqa: E402
from support.transformers_models import build_model, generated_by_transformers, prompts  # noqa: E402


def repetitive(length: int, seed: int) -> list[int]:
    """Tokens from a small alphabet: n-grams repeat, as in code or quoted text."""
    rng = random.Random(seed)
    return [rng.randrange(3, 9) for _ in range(length)]


@pytest.mark.parametrize("ngram", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 4])
def test_prompt_lookup_proposes_what_transformers_prompt_lookup_proposes(ngram, k):
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    eos = 5
    theirs = PromptLookupCandidateGenerator(
        eos_token_id=torch.tensor([eos]), num_output_tokens=k, max_matching_ngram_size=ngram, max_length=10_000
    )
    ours = PromptLookupDrafter(max_matching_ngram_size=ngram, eos_token_ids=[eos])
    for seed in range(40):
        tokens = repetitive(random.Random(seed).randrange(2, 30), seed)
        ids = torch.tensor([tokens])
        candidates, _ = theirs.get_candidates(ids)
        expected = candidates[0, len(tokens):].tolist()
        assert ours.lookup(tokens, k) == expected, tokens
        drafts = ours.propose([DraftRequest("r", tokens, 100)], k)
        assert drafts.shape == (1, k) and drafts.dtype == torch.int64
        assert drafts[0].tolist() == expected + [tokens[-1]] * (k - len(expected))  # a uniform k: filled
    assert 0 < ours.matched < ours.proposed


def test_prompt_lookup_without_a_match_still_gives_k_drafts():
    drafts = PromptLookupDrafter().propose([DraftRequest(0, [7], 10), DraftRequest(1, [3, 4, 5], 10)], 3)
    assert drafts.tolist() == [[7, 7, 7], [5, 5, 5]]
    assert isinstance(PromptLookupDrafter(), Drafter)


def test_the_replay_drafter_corrupts_at_its_rate_and_is_seeded():
    recorded = {"a": list(range(10, 210))}
    request = DraftRequest("a", recorded["a"][:50], 200)
    assert ReplayDrafter(recorded, 1.0, 512).propose([request], 4).tolist() == [recorded["a"][50:54]]
    never = ReplayDrafter(recorded, 0.0, 512).propose([request], 4)[0].tolist()
    assert all(d != t for d, t in zip(never, recorded["a"][50:54])) and all(0 <= d < 512 for d in never)
    half = ReplayDrafter(recorded, 0.6, 512, seed=3)
    rows = torch.cat([half.propose([DraftRequest("a", recorded["a"][:at], 200)], 4) for at in range(1, 190) for _ in range(10)])
    kept = (rows == torch.tensor([recorded["a"][at : at + 4] for at in range(1, 190) for _ in range(10)])).float().mean().item()
    assert abs(kept - 0.6) < 0.03
    again = ReplayDrafter(recorded, 0.6, 512, seed=3)
    assert torch.equal(torch.cat([again.propose([DraftRequest("a", recorded["a"][:at], 200)], 4) for at in range(1, 190) for _ in range(10)]), rows)
    past_end = ReplayDrafter(recorded, 1.0, 512).propose([DraftRequest("a", recorded["a"][:198], 200)], 4)
    assert past_end.tolist() == [[208, 209, 209, 209]]
    with pytest.raises(KeyError, match="no recorded continuation for request 'b'"):
        ReplayDrafter(recorded, 1.0, 512).propose([DraftRequest("b", [1], 5)], 2)
    with pytest.raises(ValueError, match="acceptance must be in"):
        ReplayDrafter(recorded, 1.5, 512)


# --- the draft model -----------------------------------------------------------------------------------------


def build_drafter(model, mode: str) -> DraftModelDrafter:
    torch._dynamo.reset()
    target_cache = paged_kv_cache(model, num_blocks=32, block_size=16, max_seq_len=128)
    drafter = draft_model_drafter(model, "cpu", like=target_cache, mode=mode, max_bs=4, max_tokens=32, max_requests=4, show_progress=False)
    drafter.capture()
    return drafter


def run_rounds(drafter: DraftModelDrafter, reference, k: int) -> list[torch.Tensor]:
    """Three requests (one prompt longer than a prefill batch) drafted over five steps; after each step a request
    keeps 0..k of its drafts plus the next token (every pattern, full acceptance included: the catch-up token),
    a fourth joins at the third step and the first leaves after the fourth. Every draft must be the draft
    model's own greedy continuation of the request's tokens."""
    texts = prompts((5, 40, 12, 9))
    contexts = {i: list(texts[i]) for i in range(3)}
    handed = []
    for step in range(5):
        if step == 2:
            contexts[3] = list(texts[3])
        if step == 4:
            drafter.release(0)
            del contexts[0]
        ids = sorted(contexts)
        drafts = drafter.propose([DraftRequest(i, contexts[i], len(texts[i]) + 40) for i in ids], k)
        handed.append(drafts)
        for row, i in enumerate(ids):
            greedy = generated_by_transformers(reference, contexts[i], k + 1)
            assert drafts[row].tolist() == greedy[:k], (step, i)
            keep = (i + step) % (k + 1)
            contexts[i] += greedy[: keep + 1]
    return handed


def test_a_draft_model_drafts_its_own_greedy_tokens_in_step_with_what_was_accepted(caplog):
    reference = build_model("llama")
    k = 3
    with torch.inference_mode():
        graphs = build_drafter(build_model("llama"), "full")
        with caplog.at_level(logging.WARNING, logger="graphhal.speculative.draft_model"):
            drafted = run_rounds(graphs, reference, k)
        snapshot = [d.clone() for d in drafted]
        assert graphs.eager_steps == 0 and not caplog.records
        eager = build_drafter(build_model("llama"), "disabled")
        with caplog.at_level(logging.WARNING, logger="graphhal.speculative.draft_model"):
            again = run_rounds(eager, reference, k)
    # Same drafts with graphs and eagerly; the drafts handed out are the drafter's copies: later replays of the
    # same graphs (every later step) left them as they were.
    assert all(torch.equal(a, b) for a, b in zip(drafted, again))
    assert all(torch.equal(a, b) for a, b in zip(drafted, snapshot))
    # Eager steps are visible: every draft step counted, the first logged once.
    assert eager.eager_steps >= 5 * k
    assert len([r for r in caplog.records if "ran a step eagerly" in r.message]) == 1
    # A released request's blocks are back; the others hold theirs until released.
    for i in (1, 2, 3):
        graphs.release(i)
    graphs.release("never seen")
    assert graphs.kv_cache.allocator.num_free == graphs.kv_cache.num_blocks - 1
    assert isinstance(graphs, Drafter)


def test_a_draft_model_catches_up_after_a_rejected_draft_and_steps_without_drafts():
    """The target disagrees: after each step the request keeps some drafts, then a correction token unlike the
    next draft, then one or two tokens of steps that ran without drafts (the plain decode, a drafter failure).
    The draft cache then holds a rejected draft at a position before the request's last token: it must be
    written again. Every propose equals what a drafter re-prefilling the request from scratch proposes, and the
    draft model's greedy continuation."""
    reference = build_model("llama")
    k = 3
    with torch.inference_mode():
        drafter = build_drafter(build_model("llama"), "disabled")
        scratch = build_drafter(build_model("llama"), "disabled")
        context = list(prompts((9,))[0])
        max_len = len(context) + 60
        for step in range(6):
            drafts = drafter.propose([DraftRequest("r", context, max_len)], k)[0].tolist()
            scratch.release("r")
            assert drafts == scratch.propose([DraftRequest("r", context, max_len)], k)[0].tolist(), step
            assert drafts == generated_by_transformers(reference, context, k), step
            keep = step % (k - 1)  # the correction replaces a draft that the drafter wrote to its cache
            context += drafts[:keep] + [(drafts[keep] + 1) % 512]
            context += generated_by_transformers(reference, context, 1 + step % 2)


def test_a_draft_model_drafter_refuses_what_its_cache_cannot_hold():
    with torch.inference_mode():
        drafter = build_drafter(build_model("llama"), "disabled")
        with pytest.raises(ValueError, match="caches up to 199 tokens .*; the draft model's KV cache serves at most 128"):
            drafter.propose([DraftRequest("long", [5] * 10, 200)], 2)
        with pytest.raises(ValueError, match="num_draft_tokens must be a positive int, got 0"):
            drafter.propose([DraftRequest("a", [5], 20)], 0)
