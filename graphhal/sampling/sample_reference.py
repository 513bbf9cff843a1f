"""The sampler's math in torch: the kernel on every device but CUDA, and the reference the Triton kernels match.

Per row, with ``x`` the raw logits (float32), ``T`` the temperature, ``M = max(x)``:

- greedy (``T == 0``, and every padded row): ``argmax(x)``, the first index on ties, as ``torch.argmax`` and
  ``generate(do_sample=False)``; the filters and random numbers are ignored.
- otherwise the token is a Gumbel-max draw among the allowed tokens:
  ``argmax over allowed i of x_i / T + g_i``, ``g_i = -log(-log(u(seed, counter, i)))``, ties to the lowest
  index. Gumbel-max draws exactly from ``softmax(x / T)`` restricted to the allowed set, renormalised.

The allowed set is every token with ``x_i >= t`` for one per-row threshold ``t = max(t_k, t_p, t_m)``, each
part ``-inf`` when its filter is off. Thresholds are raw logit values: ``x / T`` is monotone for ``T > 0``, so
comparing raw logits keeps the same tokens and is exact (a top-k threshold is one of the logits).
The filters apply in transformers' order (temperature, top-k, top-p, min-p):

- top-k: ``t_k = c_k``, the k-th largest logit. Tokens tied with it are kept, as transformers keeps them.
- top-p, over the distribution left by temperature and top-k: with ``p_j`` the probabilities of the
  candidates in descending order, token ``j`` is kept while the probability of those before it is below
  ``top_p`` (transformers' rule: the smallest prefix reaching top_p, the top token always). The
  normalisation is the logsumexp over the whole vocabulary when top-k is off, over the top-k tokens when it
  is on. ``t_p`` is the smallest kept candidate.
- min-p: keep ``p_i >= min_p * p_max`` under ``softmax(x / T)``, that is
  ``x_i / T - M / T >= log(min_p)``, that is ``x_i >= M + T * log(min_p) = t_m`` (raw logit units). Being a
  ratio to the most likely token, it is the same before or after top-k and top-p renormalise (they never drop
  the most likely token), so it commutes with them.

Top-k and top-p search among ``K = min(max_top_k, vocab)`` candidates, ``torch.topk(logits, K)``: ``max_top_k``
is a capture-time constant (graphs need fixed shapes). A top_k above it must be refused when the request
arrives (``check_sampling_params``); here it is clamped to K. A nucleus that would need more than K tokens is
cut at K: with top-p on, at most ``max_top_k`` tokens are ever candidates. A row with top-k or top-p on draws
among the K candidates only (its allowed set lies within them), so tokens tied with the K-th candidate but
left out by ``torch.topk`` stay out; a row with only min-p (or no filter) draws over the whole vocabulary.

The log-probability returned is the token's under the model's raw distribution: ``log_softmax(x)[token]``,
whatever the temperature and filters.

No host reads, no data-dependent shapes, no Python branch on a tensor value: captured op by op, every value
comes from the inputs of the step replayed.
"""

from __future__ import annotations

import torch

from graphhal.sampling.random_numbers import gumbel_noise

# Candidates for top-k and top-p unless a caller says otherwise. Five times transformers' default top_k (50),
# so the top_k values requests use fit; a nucleus needing more than 256 tokens comes only from a flat step
# (the 256 most likely tokens then hold less than top_p), whose tail is cut. Larger costs more in torch.topk
# (it sorts the K it selects) and in the finish kernel, one program per row over K candidates; a power of two
# wastes no lanes there.
DEFAULT_MAX_TOP_K = 256


def sample_reference(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seed: torch.Tensor,
    counter: torch.Tensor,
    max_top_k: int = DEFAULT_MAX_TOP_K,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of ``logits`` [rows, vocab]; returns (token ids [rows] int64, their
    log-probabilities under ``log_softmax(logits)`` [rows] float32). Parameters are [rows] tensors
    (``graphhal.sampling.sampling_slots``); the math is in the module docstring."""
    rows, vocab = logits.shape
    x = logits.float()
    candidates, candidate_ids = torch.topk(logits, min(max_top_k, vocab), dim=-1)  # sorted, descending
    candidates = candidates.float()
    parameters = _RowParameters(candidates[:, 0], temperature, min_p)

    # The pass over the whole vocabulary (the first Triton kernel's work).
    shifted = x - parameters.row_max[:, None]
    raw_sum = torch.exp(shifted).sum(-1)
    scaled_sum = torch.exp(shifted * parameters.inverse_temperature[:, None]).sum(-1)
    greedy_token = torch.argmax(x, dim=-1)
    noise = gumbel_noise(seed, counter, torch.arange(vocab, device=logits.device))
    scores = x * parameters.inverse_temperature[:, None] + noise
    full_token = torch.argmax(torch.where(x >= parameters.min_p_threshold[:, None], scores, -torch.inf), dim=-1)

    # Among the candidates (the second kernel's work).
    threshold, restricted = _candidate_threshold(candidates, parameters, top_k, top_p, scaled_sum)
    candidate_scores = candidates * parameters.inverse_temperature[:, None] + gumbel_noise(seed, counter, candidate_ids)
    candidate_scores = torch.where(candidates >= threshold[:, None], candidate_scores, -torch.inf)
    best = candidate_scores.amax(-1, keepdim=True)
    lowest_id_of_best = torch.where(candidate_scores == best, candidate_ids, vocab).amin(-1)

    sampled_token = torch.where(restricted, lowest_id_of_best, full_token)
    token = torch.where(parameters.sampled, sampled_token, greedy_token)
    logprob = x.gather(1, token[:, None])[:, 0] - parameters.row_max - torch.log(raw_sum)
    return token, logprob


class _RowParameters:
    """What every stage needs per row: the max, 1/T (1 for greedy rows, whose draws are ignored) and t_m."""

    def __init__(self, row_max: torch.Tensor, temperature: torch.Tensor, min_p: torch.Tensor) -> None:
        self.row_max = row_max
        self.sampled = temperature > 0
        # 1 / where(...), not where(..., 1 / T, ...): no division by zero anywhere (the Triton twin does the same).
        self.inverse_temperature = 1.0 / torch.where(self.sampled, temperature, 1.0)
        min_p_on = self.sampled & (min_p > 0)
        log_min_p = torch.log(torch.where(min_p_on, min_p, 1.0))
        self.min_p_threshold = torch.where(min_p_on, row_max + temperature * log_min_p, -torch.inf)


def _candidate_threshold(
    candidates: torch.Tensor,
    parameters: _RowParameters,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    scaled_sum: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's threshold ``max(t_k, t_p, t_m)`` and whether top-k or top-p restrict it to the candidates."""
    count = candidates.shape[1]
    top_k_on = top_k > 0
    kth = (top_k.clamp(1, count) - 1).to(torch.int64)
    top_k_threshold = torch.where(top_k_on, candidates.gather(1, kth[:, None])[:, 0], -torch.inf)
    in_top_k = candidates >= top_k_threshold[:, None]

    scaled = (candidates - parameters.row_max[:, None]) * parameters.inverse_temperature[:, None]
    weights = torch.where(in_top_k, torch.exp(scaled), 0.0)
    normaliser = torch.where(top_k_on, weights.sum(-1), scaled_sum)
    probabilities = weights / normaliser[:, None]
    before = torch.cumsum(probabilities, dim=-1) - probabilities
    top_p_on = top_p < 1
    in_nucleus = in_top_k & (before < top_p[:, None])
    top_p_threshold = torch.where(top_p_on, torch.where(in_nucleus, candidates, torch.inf).amin(-1), -torch.inf)

    threshold = torch.maximum(torch.maximum(top_k_threshold, top_p_threshold), parameters.min_p_threshold)
    return threshold, top_k_on | top_p_on
