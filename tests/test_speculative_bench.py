"""``graphhal bench --spec`` on the cpu device's tiny llama: every part runs, and what must hold exactly does.

The figures are a GPU's to give; here the bench's own arithmetic and invariants are checked: at acceptance 1.0
a verify step yields exactly k + 1 tokens a request, every speculative run hands out the plain run's tokens
(the replay drafter proposes them, the verify step decides), and the table renders every row.
"""

from __future__ import annotations

import pytest

from graphhal.bench.speculative import expected_tokens_per_verify
from graphhal.bench.timing import TimerSettings

QUICK = TimerSettings(min_repeats=2, max_repeats=3, budget_s=0.2, warmup_steps=1)


def test_expected_tokens_per_verify_is_the_geometric_sum():
    assert expected_tokens_per_verify(1.0, 3) == 4
    assert expected_tokens_per_verify(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens_per_verify(0.0, 4) == 1


def test_the_spec_bench_measures_every_part_on_cpu():
    pytest.importorskip("transformers")
    from graphhal.bench import speculative

    result = speculative.run("cpu", [2], new_tokens=6, k_values=[1, 3], acceptances=[0.5, 1.0], timer=QUICK)
    (costs,) = result.steps
    assert costs.batch == 2 and set(costs.verify_ms) == {1, 3} and costs.decode_ms > 0 and costs.draft_ms > 0
    plain, *speculative_rates = result.loops
    assert plain.k == 0 and plain.same_tokens and plain.tokens_per_s > 0
    assert [(rate.k, rate.acceptance) for rate in speculative_rates] == [(1, 0.5), (1, 1.0), (3, 0.5), (3, 1.0)]
    assert all(rate.same_tokens for rate in speculative_rates)  # the drafts never change the output
    assert plain.full_batch_tokens_per_s is None  # the plain loop has no verify steps to window
    for rate in speculative_rates:
        assert rate.ideal_tokens_per_s > 0 and 1 <= rate.tokens_per_verify <= rate.k + 1
        # The first verify step has room for k + 1 tokens in every request (6 new tokens, 1 from the prefill).
        assert rate.full_batch_tokens_per_s is not None and rate.full_batch_tokens_per_s > 0
        if rate.acceptance == 1.0:
            assert rate.tokens_per_verify == rate.k + 1
    assert set(result.lookup) == {"k", "graphhal", "transformers", "acceptance"} and result.lookup["k"] == 3
    text = speculative.render(result)
    assert "verify k=3" in text and "prompt lookup at batch 1" in text and "full-batch tok/s" in text
    assert len([line for line in text.splitlines() if line.strip().startswith("2  ")]) == 1 + 1 + 4  # steps, loops


def test_a_speculative_run_whose_tokens_differ_in_half_precision_is_explained_below_the_table():
    import torch

    from graphhal.bench import speculative

    rate = speculative.LoopRate(batch=64, k=2, acceptance=1.0, tokens_per_s=1.0, tokens_per_verify=1.1, ideal_tokens_per_s=3.0, same_tokens=False)
    explained = speculative.render(speculative.SpecBench("cuda:0", torch.bfloat16, "llama", loops=[rate]))
    assert "NO" in explained and "--dtype float32" in explained
    # In float32 a difference is no rounding matter: the row says NO and nothing explains it away.
    unexplained = speculative.render(speculative.SpecBench("cuda:0", torch.float32, "llama", loops=[rate]))
    assert "NO" in unexplained and "--dtype float32" not in unexplained
