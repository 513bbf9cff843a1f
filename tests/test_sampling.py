"""What the sampler draws: greedy as argmax, the filters' guarantees, the distribution against torch's and
transformers', and random numbers that belong to a request's (seed, counter) alone.

Everything here runs the sampler on the cpu (the torch math, ``sample_reference``, through ``sample``); the
Triton kernels are checked against it in test_triton_sample.py, the runners in test_sampling_runner.py.
Statistical checks draw with fixed seeds, so each is deterministic: it cannot flake, and its bound (a
chi-square tail of 1e-6) is loose enough for any correct sampler yet far below what a wrong one scores (each
test shows that its bound rejects a nearby wrong distribution).
"""

from __future__ import annotations

import math

import pytest
import torch

from graphhal.sampling import (
    SAMPLING_SLOT_NAMES,
    SamplingParams,
    check_sampling_params,
    sample,
    sample_reference,
    sampling_inputs,
    sampling_slots,
    uniforms,
)
from graphhal.sampling.random_numbers import mix32

# --- helpers ----------------------------------------------------------------------------------------------


def params(rows: int, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, counter=None) -> dict[str, torch.Tensor]:
    """Per-row parameter tensors: a scalar for every row, or a list with one value per row."""

    def column(value, dtype):
        if isinstance(value, torch.Tensor):
            return value.to(dtype)
        return torch.tensor(value if isinstance(value, list) else [value] * rows, dtype=dtype)

    return {
        "temperature": column(temperature, torch.float32),
        "top_k": column(top_k, torch.int32),
        "top_p": column(top_p, torch.float32),
        "min_p": column(min_p, torch.float32),
        "seed": column(seed, torch.int64),
        "counter": column(torch.arange(rows) if counter is None else counter, torch.int64),
    }


def draw(logits: torch.Tensor, max_top_k: int = 256, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    return sample(logits, **params(logits.shape[0], **kwargs), max_top_k=max_top_k)


def random_logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def chi_square_bound(degrees: int, tail_z: float = 4.75) -> float:
    """The chi-square value a correct sampler exceeds with probability about 1e-6 (z = 4.75), by Wilson and
    Hilferty's approximation (within 1 % of the exact quantile from 5 degrees of freedom)."""
    h = 2.0 / (9.0 * degrees)
    return degrees * (1.0 - h + tail_z * math.sqrt(h)) ** 3


def chi_square(counts: torch.Tensor, probabilities: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of ``counts`` against ``probabilities`` and its degrees of freedom; categories of
    probability 0 must have no counts (asserted: a draw outside the support is a bug, not a statistic)."""
    support = probabilities > 0
    assert counts[~support].sum() == 0, f"drew tokens of probability 0: {torch.nonzero(counts * ~support).flatten().tolist()}"
    expected = probabilities[support].double() * counts.sum()
    assert expected.min() >= 5, "too few draws per category for the chi-square approximation"
    statistic = ((counts[support].double() - expected) ** 2 / expected).sum().item()
    return statistic, int(support.sum()) - 1


def frequencies_of(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab)


# --- greedy -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax_first_index_on_ties_whatever_the_filters_and_seed(dtype):
    logits = random_logits(6, 50, seed=1).to(dtype)
    logits[1, [7, 30]] = logits[1].max() + 1  # a tie for the maximum: the first index wins
    logits[2] = 0.0  # all tied
    tokens, _ = draw(logits, temperature=0.0, top_k=[0, 3, 1, 0, 5, 0], top_p=[1, 0.5, 1, 0.1, 1, 1],
                     min_p=[0, 0, 0.5, 0, 0, 1], seed=[1, 2, 3, 4, 5, 6])
    assert torch.equal(tokens, torch.argmax(logits, dim=-1))
    assert tokens[1] == 7 and tokens[2] == 0


def test_the_slots_fills_make_a_padded_row_greedy():
    slots = {slot.name: slot for slot in sampling_slots()}
    assert tuple(slots) == SAMPLING_SLOT_NAMES == ("temperature", "top_k", "top_p", "min_p", "seed", "counter")
    assert {name: (slot.dtype, slot.fill) for name, slot in slots.items()} == {
        "temperature": (torch.float32, 0.0), "top_k": (torch.int32, 0), "top_p": (torch.float32, 1.0),
        "min_p": (torch.float32, 0.0), "seed": (torch.int64, 0), "counter": (torch.int64, 0),
    }
    logits = random_logits(3, 40, seed=2)
    padded = {name: torch.full((3,), slot.fill, dtype=slot.dtype) for name, slot in slots.items()}
    tokens, logprobs = sample(logits, **padded)
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.isfinite(logprobs).all()


# --- what each filter guarantees ----------------------------------------------------------------------------

ROWS, VOCAB = 3000, 200


def stress_logits() -> torch.Tensor:
    """Many rows of varied shape: some peaked, some flat, each row its own draw."""
    logits = random_logits(ROWS, VOCAB, seed=3, scale=1.0)
    return logits * torch.linspace(0.2, 6.0, ROWS)[:, None]


def test_top_k_never_yields_a_token_outside_the_top_k():
    logits = stress_logits()
    top_k = torch.randint(1, 20, (ROWS,), generator=torch.Generator().manual_seed(4))
    tokens, _ = draw(logits, temperature=2.0, top_k=top_k, seed=5)
    kth_largest = torch.stack([row.topk(int(k)).values[-1] for row, k in zip(logits, top_k)])
    assert (logits.gather(1, tokens[:, None])[:, 0] >= kth_largest).all()
    assert (tokens != logits.argmax(-1)).float().mean() > 0.3  # it did sample, not just take the argmax


def test_top_p_never_yields_a_token_outside_the_nucleus():
    logits = stress_logits()
    top_p = torch.rand(ROWS, generator=torch.Generator().manual_seed(6)) * 0.9 + 0.05
    temperature = 1.5
    tokens, _ = draw(logits, temperature=temperature, top_p=top_p, seed=7)
    probabilities = torch.softmax(logits.double() / temperature, dim=-1)
    token_probability = probabilities.gather(1, tokens[:, None])
    # The probability of every token more likely than the one drawn must stay below top_p: else the nucleus
    # was complete before reaching it.
    more_likely = (probabilities * (probabilities > token_probability)).sum(-1)
    assert (more_likely < top_p.double() + 1e-6).all()
    assert (tokens != logits.argmax(-1)).float().mean() > 0.3


def test_min_p_never_yields_a_token_below_its_threshold():
    logits = stress_logits()
    min_p = torch.rand(ROWS, generator=torch.Generator().manual_seed(8)) * 0.5
    temperature = 2.0
    tokens, _ = draw(logits, temperature=temperature, min_p=min_p, seed=9)
    probabilities = torch.softmax(logits.double() / temperature, dim=-1)
    token_probability = probabilities.gather(1, tokens[:, None])[:, 0]
    assert (token_probability >= min_p.double() * probabilities.amax(-1) * (1 - 1e-5)).all()
    assert (tokens != logits.argmax(-1)).float().mean() > 0.3


def test_top_p_is_cut_at_max_top_k_candidates_and_top_k_beyond_them_is_clamped():
    logits = torch.zeros(400, 100)  # flat: a nucleus of 0.99 would want 99 tokens
    logits[:, 50:] += 1e-3 * torch.arange(50)  # distinct values: the 8 candidates are tokens 92..99
    tokens, _ = draw(logits, max_top_k=8, top_p=0.99, seed=10)
    assert tokens.min() >= 92 and len(tokens.unique()) == 8
    tokens, _ = draw(logits, max_top_k=8, top_k=50, seed=10)  # refused by check_sampling_params; here clamped
    assert tokens.min() >= 92


# --- the distribution --------------------------------------------------------------------------------------

DRAWS = 40_000


def test_temperature_sampling_frequencies_match_torch_multinomial():
    vocab, temperature = 12, 0.8
    row = random_logits(1, vocab, seed=11, scale=1.0)[0]
    probabilities = torch.softmax(row.double() / temperature, dim=-1)
    ours = frequencies_of(draw(row.expand(DRAWS, vocab), temperature=temperature, seed=12)[0], vocab)
    theirs = frequencies_of(torch.multinomial(probabilities, DRAWS, replacement=True, generator=torch.Generator().manual_seed(13)), vocab)

    bound = chi_square_bound(vocab - 1)
    ours_statistic, degrees = chi_square(ours, probabilities)
    theirs_statistic, _ = chi_square(theirs, probabilities)
    assert ours_statistic < bound and theirs_statistic < bound, (ours_statistic, theirs_statistic, bound)
    # Two samples of one distribution: the 2 x vocab table of counts is homogeneous.
    pooled = (ours + theirs).double() / (2 * DRAWS)
    homogeneity = sum(((c.double() - pooled * DRAWS) ** 2 / (pooled * DRAWS)).sum().item() for c in (ours, theirs))
    assert homogeneity < bound, homogeneity
    # The bound has power: the same draws are far outside it against temperature 1.
    wrong_statistic, _ = chi_square(ours, torch.softmax(row.double(), dim=-1))
    assert wrong_statistic > 10 * bound


# (temperature, top_k, top_p, min_p): each filter alone and together, in transformers' order.
FILTER_CASES = [
    (1.0, 5, 1.0, 0.0),
    (0.7, 0, 0.8, 0.0),
    (1.3, 0, 1.0, 0.15),
    (1.2, 8, 0.7, 0.0),  # top-p over the distribution top-k left, renormalised
    (2.0, 10, 0.9, 0.1),
]


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", FILTER_CASES)
def test_filtered_frequencies_match_transformers_logits_warpers(temperature, top_k, top_p, min_p):
    logits_process = pytest.importorskip("transformers.generation.logits_process")
    vocab = 24
    row = random_logits(1, vocab, seed=14, scale=1.5)
    warpers = [logits_process.TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(logits_process.TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(logits_process.TopPLogitsWarper(top_p))
    if min_p:
        warpers.append(logits_process.MinPLogitsWarper(min_p))
    scores = row.double()
    for warper in warpers:
        scores = warper(None, scores)
    probabilities = torch.softmax(scores, dim=-1)[0]

    tokens, _ = draw(row.expand(DRAWS, vocab), temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=15)
    statistic, degrees = chi_square(frequencies_of(tokens, vocab), probabilities)
    assert statistic < chi_square_bound(degrees), (statistic, degrees)
    unfiltered = torch.softmax(row[0].double() / temperature, dim=-1)
    assert (probabilities == 0).any(), "the case must filter something"
    assert frequencies_of(tokens, vocab)[(probabilities == 0) & (unfiltered > 0.01)].sum() == 0


def test_logprobs_are_the_raw_distributions_whatever_the_temperature_and_filters():
    logits = random_logits(64, 300, seed=16).to(torch.bfloat16)
    tokens, logprobs = draw(logits, temperature=[0.0, 0.5, 1.0, 3.0] * 16, top_k=[0, 0, 5, 0] * 16, top_p=0.9, seed=17)
    assert logprobs.dtype == torch.float32 and tokens.dtype == torch.int64
    expected = torch.log_softmax(logits.float(), dim=-1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(logprobs, expected, rtol=1e-5, atol=1e-5)


# --- one request's random numbers are its own ----------------------------------------------------------------


def test_a_rows_token_depends_on_its_seed_and_counter_only_not_on_its_neighbours_or_position():
    logits = random_logits(8, 500, seed=18, scale=0.5)
    kwargs = dict(temperature=[0.9] * 8, top_k=[0, 50, 0, 0, 10, 0, 0, 0], top_p=[1, 1, 0.8, 1, 0.9, 1, 1, 1],
                  min_p=[0, 0, 0, 0.05, 0, 0, 0, 0], seed=list(range(100, 108)), counter=list(range(7, 15)))
    tokens, logprobs = draw(logits, **kwargs)

    order = [5, 2, 7, 0, 3]  # some of the rows, shuffled, between rows that were not in the first batch
    strangers = dict(temperature=[0.5, 2.0, 0.0], top_k=[3, 0, 0], top_p=[1, 0.5, 1], min_p=[0, 0, 0.2],
                     seed=[1, 2, 3], counter=[0, 0, 0])
    mixed_kwargs = {name: strangers[name][:1] + [kwargs[name][i] for i in order] + strangers[name][1:] for name in kwargs}
    strange_logits = random_logits(3, 500, seed=19)
    mixed = torch.cat([strange_logits[:1], logits[order], strange_logits[1:]])
    mixed_tokens, mixed_logprobs = draw(mixed, **mixed_kwargs)
    assert torch.equal(mixed_tokens[1:-2], tokens[order])
    assert torch.equal(mixed_logprobs[1:-2], logprobs[order])


def test_different_counters_and_different_seeds_draw_differently():
    flat = torch.zeros(200, 1000)  # uniform over 1000 tokens
    by_counter, _ = draw(flat, seed=21, counter=torch.arange(200))
    by_seed, _ = draw(flat, seed=torch.arange(200), counter=5)
    # 200 uniform draws of 1000 tokens repeat about 20 times; identical draws would give one token.
    assert len(by_counter.unique()) > 150 and len(by_seed.unique()) > 150
    again, _ = draw(flat, seed=21, counter=torch.arange(200))
    assert torch.equal(again, by_counter)  # and the same ones again, run after run


def test_uniforms_are_the_documented_hash_bit_for_bit():
    def lowbias32(word: int) -> int:
        word ^= word >> 16
        word = (word * 0x7FEB352D) & 0xFFFFFFFF
        word ^= word >> 15
        word = (word * 0x846CA68B) & 0xFFFFFFFF
        return word ^ (word >> 16)

    def uniform(seed: int, counter: int, index: int) -> float:
        seed_low, seed_high = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
        counter_low, counter_high = counter & 0xFFFFFFFF, (counter >> 32) & 0xFFFFFFFF
        key = lowbias32(seed_low ^ 0x9E3779B9)
        key = lowbias32(key ^ seed_high ^ 0x85EBCA6B)
        key = lowbias32(key ^ counter_low ^ 0xC2B2AE35)
        first = lowbias32(key ^ counter_high ^ 0x27D4EB2F)
        second = lowbias32(first ^ 0x165667B1)
        word = lowbias32(lowbias32(index ^ first) ^ second)
        return ((word >> 9) * 2 + 1) / 2**24

    int64 = torch.iinfo(torch.int64)
    seeds = [0, 1, -1, 2**32, 2**32 - 1, int64.min, int64.max, 1234567890123]
    counters = [0, 1, 2**31, 2**40 + 3, int64.max, 7, 0, 99]
    indices = torch.tensor([0, 1, 2, 1000, 128_255, 2**31 - 1])
    got = uniforms(torch.tensor(seeds), torch.tensor(counters), indices)
    expected = torch.tensor([[uniform(s, c, int(i)) for i in indices] for s, c in zip(seeds, counters)], dtype=torch.float64)
    assert torch.equal(got.double(), expected)
    words = torch.tensor([0, 1, 0xFFFFFFFF, 0x12345678])
    assert mix32(words).tolist() == [lowbias32(int(w)) for w in words]


def test_uniforms_are_inside_the_open_interval_uniform_and_uncorrelated_across_counters_and_seeds():
    count = 100_000
    u = uniforms(torch.tensor([3, 3, 4]), torch.tensor([0, 1, 0]), torch.arange(count))
    assert (u > 0).all() and (u < 1).all()
    assert abs(u.double().mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / count)
    histogram = torch.histc(u[0], bins=20, min=0, max=1)
    statistic, degrees = chi_square(histogram.long(), torch.full((20,), 1 / 20))
    assert statistic < chi_square_bound(degrees)
    # Neighbouring counters and neighbouring seeds: correlation within 5 standard errors of 0.
    for a, b in ((0, 1), (0, 2)):
        correlation = torch.corrcoef(u[[a, b]].double())[0, 1].item()
        assert abs(correlation) < 5 / math.sqrt(count), (a, b, correlation)


# --- parameters a request may ask for ----------------------------------------------------------------------


def test_checked_parameters_say_what_is_wrong_and_what_is_allowed():
    assert SamplingParams(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05, seed=-3).check(max_top_k=256)
    cases = [
        (dict(top_k=300), r"request 7: top_k must be in 0\.\.256 .*max_top_k.*got 300"),
        (dict(top_k=-1), r"top_k must be in 0\.\.256 \(0 turns it off"),
        (dict(temperature=-0.1), r"temperature must be 0 \(greedy\) or a finite number >= 1e-05"),
        (dict(temperature=1e-7), r"temperature must be 0"),
        (dict(temperature=float("nan")), r"temperature must be 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(min_p=-0.5), r"min_p must be in \[0, 1\]"),
        (dict(seed=2**63), r"seed must fit int64"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            SamplingParams(**change).check(max_top_k=256, where="request 7")
    with pytest.raises(TypeError, match="top_k must be an int, got 2.5"):
        check_sampling_params(temperature=1.0, top_k=2.5, top_p=1.0, min_p=0.0, seed=0, max_top_k=8)
    with pytest.raises(TypeError, match="temperature must be a number, got True"):
        check_sampling_params(temperature=True, top_k=0, top_p=1.0, min_p=0.0, seed=0, max_top_k=8)


def test_sampling_inputs_build_the_slots_of_a_batch():
    batch = sampling_inputs([SamplingParams.greedy(), SamplingParams(0.5, 3, 0.9, 0.1, seed=-9)], [0, 41], "cpu")
    dtypes = {slot.name: slot.dtype for slot in sampling_slots()}
    assert list(batch) == list(SAMPLING_SLOT_NAMES)
    assert all(batch[name].dtype == dtypes[name] and batch[name].shape == (2,) for name in batch)
    assert batch["seed"].tolist() == [0, -9] and batch["counter"].tolist() == [0, 41] and batch["top_k"].tolist() == [0, 3]
    with pytest.raises(ValueError, match="2 parameter sets but 1 counters"):
        sampling_inputs([SamplingParams(), SamplingParams()], [0], "cpu")
    with pytest.raises(ValueError, match="row 0: counter must be a non-negative int64"):
        sampling_inputs([SamplingParams()], [-1], "cpu")


def test_a_seed_left_unset_is_accepted_where_a_request_arrives_and_refused_where_a_sampled_row_becomes_tensors():
    unseeded = SamplingParams(temperature=0.8)
    assert unseeded.seed is None and unseeded.check(max_top_k=8)  # the loop gives it a seed when it is added
    with pytest.raises(ValueError, match=r"sampling_inputs row 1: seed is None and the row samples .*seed=\.\.\."):
        sampling_inputs([SamplingParams(temperature=0.8, seed=3), unseeded], [0, 0], "cpu")
    assert sampling_inputs([SamplingParams.greedy()], [0], "cpu")["seed"].tolist() == [0]  # a greedy row draws nothing


def test_sample_refuses_bad_shapes_dtypes_and_max_top_k():
    logits = torch.zeros(2, 10)
    with pytest.raises(ValueError, match=r"max_top_k must be a positive int"):
        sample(logits, **params(2), max_top_k=0)
    with pytest.raises(ValueError, match=r"logits must be \[rows, vocab\]"):
        sample(logits[0], **params(1))
    with pytest.raises(TypeError, match=r"temperature must be a \[2\] tensor of torch.float32 .* got \(2,\) torch.float64"):
        sample(logits, **{**params(2), "temperature": torch.ones(2, dtype=torch.float64)})
    with pytest.raises(TypeError, match=r"seed must be a \[2\] tensor of torch.int64 .* got \(3,\) torch.int64"):
        sample(logits, **{**params(2), "seed": torch.zeros(3, dtype=torch.int64)})


def test_the_op_and_the_direct_call_agree_and_an_empty_batch_is_empty():
    logits = random_logits(5, 64, seed=22)
    kwargs = params(5, temperature=[0, 1, 1, 0.5, 2], top_k=[0, 0, 4, 0, 0], top_p=[1, 1, 1, 0.7, 1], seed=23)
    direct = sample(logits, **kwargs, max_top_k=16)
    through_the_op = torch.ops.graphhal.sample(logits, *kwargs.values(), 16)
    assert torch.equal(direct[0], through_the_op[0]) and torch.equal(direct[1], through_the_op[1])
    assert torch.equal(direct[0], sample_reference(logits, *kwargs.values(), 16)[0])
    tokens, logprobs = sample(torch.zeros(0, 64), **params(0))
    assert tokens.shape == logprobs.shape == (0,)
