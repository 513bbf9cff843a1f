"""Greedy verification on the device: the longest prefix of drafts equal to the target's argmax, plus the bonus.

``greedy_verify`` must decide exactly what token-by-token greedy decoding would have produced (ties go to
the first index, as ``generate(do_sample=False)``), without reading a value on the host, so that it runs in
the captured verify step: ``GreedyVerifyStep`` in a runner's graph hands back the same verdict as eagerly.
"""

from __future__ import annotations

import pytest
import torch

from graphhal.paged_attention import PagedKVCache
from graphhal.refmodel import DecodeWorkload, LlamaDecoder, ModelConfig
from graphhal.speculative import (
    GreedyVerifyStep,
    accepted_token_mask,
    context_lens_after,
    greedy_tokens,
    greedy_verify,
)
from runners import DecodeConfig, DecodeRunner

CONFIG = ModelConfig.tiny()


def test_all_none_and_partial_acceptance():
    target = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8]])
    drafts = torch.tensor([[5, 6, 7], [9, 6, 7], [5, 6, 1], [5, 2, 7]])  # all, none, two, one (a later match after a miss counts not)
    result = greedy_verify(target, drafts)
    assert result.accepted.tolist() == [3, 0, 2, 1]
    assert result.num_tokens.tolist() == [4, 1, 3, 2]
    outputs = [row[:n].tolist() for row, n in zip(result.tokens, result.num_tokens.tolist())]
    assert outputs == [[5, 6, 7, 8], [5], [5, 6, 7], [5, 6]]  # accepted drafts, then the bonus or correction
    assert result.accepted.dtype == result.num_tokens.dtype == result.tokens.dtype == torch.int64


def test_no_drafts_is_a_plain_greedy_step():
    result = greedy_verify(torch.tensor([[3], [4]]), torch.empty(2, 0, dtype=torch.int64))
    assert result.accepted.tolist() == [0, 0] and result.num_tokens.tolist() == [1, 1]


def test_ties_go_to_the_first_index_as_greedy_generate():
    logits = torch.zeros(1, 3, 6)
    logits[0, 0, [2, 4]] = 1.0  # tie: 2
    logits[0, 1, [1, 3]] = 1.0  # tie: 1
    logits[0, 2, 5] = 1.0
    target = greedy_tokens(logits)
    assert target.tolist() == [[2, 1, 5]]
    assert greedy_verify(target, torch.tensor([[2, 3]])).accepted.tolist() == [1]  # 3 is the tie's second index
    assert greedy_verify(target, torch.tensor([[2, 1]])).accepted.tolist() == [2]


def test_shapes_that_do_not_go_together_are_refused():
    with pytest.raises(ValueError, match=r"expected drafts of shape \(2, 3\)"):
        greedy_verify(torch.zeros(2, 4, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"target_tokens \[n, k \+ 1\]"):
        greedy_verify(torch.zeros(2, 4, 5), torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="greedy_tokens"):
        greedy_verify(torch.zeros(2, 4), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="target_tokens and drafts must be on one device; target_tokens are on cpu, drafts on meta"):
        greedy_verify(torch.zeros(2, 4, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.int64, device="meta"))


def test_lengths_roll_back_to_the_accepted_tokens():
    seq_lens = torch.tensor([13, 9], dtype=torch.int32)  # contexts 10 and 6, then q = 3 new tokens each
    num_tokens = torch.tensor([3, 1])  # both drafts accepted; none
    # The input token and the accepted drafts stay cached; the bonus token is the next step's input.
    assert context_lens_after(seq_lens, num_tokens, 3).tolist() == [13, 7]
    assert accepted_token_mask(num_tokens, 3).tolist() == [[True, True, True], [True, False, False]]


def test_verification_reads_nothing_on_the_host():
    """Under a mode refusing every host read of a tensor, greedy_verify still runs: it is all device math."""

    class NoHostReads(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__):
                raise AssertionError(f"host read: {func}")
            return func(*args, **(kwargs or {}))

    target, drafts = torch.tensor([[1, 2, 3]]), torch.tensor([[1, 5]])
    with NoHostReads():
        result = greedy_verify(target, drafts)
    assert result.accepted.tolist() == [1]


@pytest.mark.parametrize("mode", ["full", "breakable", "piecewise"])
def test_verify_step_in_a_graph_equals_eager(graph_device, mode):
    """The verdict comes out of the graph: accepted counts, tokens and num_tokens equal the eager step's,
    drafts copied from the target's own greedy tokens so that every acceptance length occurs."""
    cache = PagedKVCache(CONFIG, num_blocks=128, device=graph_device, dtype=torch.float32)
    model = LlamaDecoder(CONFIG, graph_device, torch.float32)
    workload = DecodeWorkload(cache, 4, max_context_len=40, query_tokens=4)
    step = GreedyVerifyStep(model.decode_forward(cache), keep_logits=True)
    runner = DecodeRunner(step, workload.input_slots(), graph_device, DecodeConfig(mode=mode, buckets=[2, 4], query_tokens=4, show_progress=False))
    with torch.inference_mode():
        runner.capture()
        batch = dict(workload.batch())
        # Request r's first r drafts are the target's own greedy tokens, then a wrong one: it accepts r. Draft j
        # is set from a step whose drafts before j are already final (the target's token j - 1 depends on them).
        ids = batch["input_ids"].clone()
        for j in range(1, 4):
            batch["input_ids"] = ids
            target = greedy_tokens(step(**batch)["logits"])
            for r in range(4):
                if r >= j:
                    ids[r, j] = target[r, j - 1]
                elif r == j - 1:
                    ids[r, j] = (target[r, j - 1] + 1) % CONFIG.vocab_size
        batch["input_ids"] = ids
        eager = {name: value.clone() for name, value in step(**batch).items()}
        graph = runner.run(batch)
    assert eager["accepted"].tolist() == [0, 1, 2, 3]
    for name in ("accepted", "tokens", "num_tokens"):
        assert torch.equal(graph[name], eager[name]), name
    torch.testing.assert_close(graph["logits"], eager["logits"])


def test_verify_step_wants_query_tokens():
    cache = PagedKVCache(CONFIG, num_blocks=16, device="cpu", dtype=torch.float32)
    step = GreedyVerifyStep(LlamaDecoder(CONFIG).decode_forward(cache))
    with pytest.raises(ValueError, match="query_tokens=1 \\+ k"):
        step(**DecodeWorkload(cache, 1, max_context_len=8).batch())


def test_a_submitted_verdict_survives_a_draft_runner_replaying_in_the_same_pool(graph_device):
    """The verify runner's outputs handed out by ``submit`` are the caller's: a draft model's runner replaying in
    the same pool afterwards (as a drafter does before the next verify step) cannot overwrite them, where the
    views ``run`` hands back would be."""
    cache = PagedKVCache(CONFIG, num_blocks=128, device=graph_device, dtype=torch.float32)
    model = LlamaDecoder(CONFIG, graph_device, torch.float32)
    draft_cache = PagedKVCache(CONFIG, num_blocks=64, device=graph_device, dtype=torch.float32)
    draft_model = LlamaDecoder(CONFIG, graph_device, torch.float32, seed=5)
    verify_requests = DecodeWorkload(cache, 4, max_context_len=30, query_tokens=3, seed=3)
    draft_requests = DecodeWorkload(draft_cache, 4, max_context_len=30, seed=4)
    step = GreedyVerifyStep(model.decode_forward(cache), keep_logits=True)
    quiet = dict(buckets=[4], show_progress=False)
    with torch.inference_mode():
        verify = DecodeRunner(step, verify_requests.input_slots(), graph_device, DecodeConfig(query_tokens=3, **quiet))
        verify.capture()
        draft = DecodeRunner(draft_model.decode_forward(draft_cache), draft_requests.input_slots(), graph_device, DecodeConfig(**quiet), pool=verify.pool)
        draft.capture()
        expected = {name: value.clone() for name, value in step(**verify_requests.batch()).items()}
        handle = verify.submit(verify_requests.batch())
        for _ in range(3):
            draft.run(draft_requests.batch())
        handle.wait()
    for name in ("accepted", "tokens", "num_tokens"):
        assert torch.equal(handle.outputs[name], expected[name]), name
    torch.testing.assert_close(handle.outputs["logits"], expected["logits"])
