"""The sampler on CUDA: ``torch.topk`` for the candidates, then two Triton kernels. Graph-safe throughout.

    candidates, ids = torch.topk(logits, K)       # K = min(max_top_k, vocab), a capture-time constant
    _vocabulary_pass_kernel[(rows, chunks)]       # one read of the logits: everything over the whole vocabulary
    _finish_kernel[(rows,)]                       # per row: thresholds, the candidates' draw, the final token

The math is ``graphhal.sampling.sample_reference``'s, stage for stage, so that the kernels and the torch
reference choose the same tokens from the same logits (bit-identical under Triton's interpreter, where both
compute in IEEE float32; compiled, a token could differ only where two scores tie within rounding).

The vocabulary pass reads every logit once: 16 MiB of bf16 at batch 64 and a 128K vocabulary. Each program
takes one chunk of one row, so a batch of 64 keeps 2,048 programs in flight rather than 64 (one per row
would leave half of an H100's SMs idle, each streaming 256 KiB alone). The row maximum comes from the
candidates (``candidates[:, 0]``), known before the pass starts, so a single read serves everything: the sums
``exp(x - M)`` (log-probabilities) and ``exp((x - M) / T)`` (top-p's normalisation), the greedy argmax (first
index equal to M), and the Gumbel-max draw under the min-p threshold, with each element's random number
hashed in registers: the pass's costliest arithmetic, so only rows whose token that draw decides (sampled,
neither top-k nor top-p on) do it. Per chunk it writes five numbers; the finish kernel combines them in
chunk order (ties still go to the lowest index).

Measured on an H100 (torch 2.11, bf16, 128,256 tokens, batch 64, every row hashing): the sampler took 157 us,
``torch.topk`` 111 us of it (K = 256; 103 us at K = 64: the radix selection over the row costs, not K) and
the vocabulary pass 42 us (37 to 48 us over chunk sizes 2,048 to 8,192 and 4 to 16 warps: the default
stays).

Graph safety: every parameter is loaded from device memory inside the kernels; the host passes only shapes,
strides and constexprs that a runner's bucket fixes (rows, vocabulary, K, chunk size, the logits' dtype).
Nothing reads back to the host and no shape depends on a value.

The hash's Triton twin lives in ``triton_random``. This module imports triton at import time; only the op's CUDA kernel and the tests import it. Under
``TRITON_INTERPRET=1`` (set before this module is first imported) the kernels run on CPU tensors.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from graphhal.sampling.triton_random import gumbel, row_keys

# Elements of one row a program of the vocabulary pass reads, in one tile: 4,096 bf16 logits are 8 KiB, 16
# per thread with 8 warps. At 128,256 tokens that is 32 chunks a row (the last one partial).
DEFAULT_CHUNK_SIZE = 4096
_VOCABULARY_PASS_WARPS = 8
_NO_INDEX = tl.constexpr(2**31 - 1)  # larger than any token id: "no index" in a min-reduction

@triton.jit
def _row_parameters(temperature_ptr, min_p_ptr, row, row_max):
    """(sampled, 1/T, t_m) as ``sample_reference._RowParameters``."""
    temperature = tl.load(temperature_ptr + row)
    min_p = tl.load(min_p_ptr + row)
    sampled = temperature > 0
    inverse_temperature = 1.0 / tl.where(sampled, temperature, 1.0)
    min_p_on = sampled & (min_p > 0)
    log_min_p = tl.log(tl.where(min_p_on, min_p, 1.0))
    min_p_threshold = tl.where(min_p_on, row_max + temperature * log_min_p, -float("inf"))
    return sampled, inverse_temperature, min_p_threshold


@triton.jit
def _vocabulary_pass_kernel(
    logits_ptr, candidates_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, counter_ptr,
    raw_sum_ptr, scaled_sum_ptr, greedy_ptr, best_score_ptr, best_id_ptr,
    vocab, num_chunks, stride_logits_row, stride_candidates_row,
    CHUNK: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    row_max = tl.load(candidates_ptr + row.to(tl.int64) * stride_candidates_row).to(tl.float32)
    sampled, inverse_temperature, min_p_threshold = _row_parameters(temperature_ptr, min_p_ptr, row, row_max)
    # The draw over the whole vocabulary decides a row's token only where the row samples and neither top-k nor
    # top-p restricts it to the candidates (the finish kernel's ``restricted``). Every other row skips it: a
    # random number hashed per logit is most of this pass's work, and greedy rows and top-k/top-p rows are the
    # common ones. One branch per program (a row's chunk), so no lane diverges.
    restricted = (tl.load(top_k_ptr + row) > 0) | (tl.load(top_p_ptr + row) < 1)
    draws_over_vocabulary = sampled & (restricted == 0)

    ids = chunk * CHUNK + tl.arange(0, CHUNK)
    in_vocab = ids < vocab
    x = tl.load(logits_ptr + row.to(tl.int64) * stride_logits_row + ids, mask=in_vocab, other=-float("inf"))
    x = x.to(tl.float32)

    shifted = x - row_max
    raw_sum = tl.sum(tl.exp(shifted), axis=0)  # exp(-inf) = 0 past the vocabulary
    scaled_sum = tl.sum(tl.exp(shifted * inverse_temperature), axis=0)
    greedy = tl.min(tl.where(in_vocab & (x == row_max), ids, _NO_INDEX), axis=0)

    if draws_over_vocabulary:
        first_key, second_key = row_keys(seed_ptr, counter_ptr, row)
        scores = x * inverse_temperature + gumbel(first_key, second_key, ids)
        scores = tl.where(in_vocab & (x >= min_p_threshold), scores, -float("inf"))
        best = tl.max(scores, axis=0)
        best_id = tl.min(tl.where(scores == best, ids, _NO_INDEX), axis=0)
    else:  # never read: the finish kernel takes the candidates' draw or the greedy token for this row
        best = tl.full((), -float("inf"), tl.float32)
        best_id = tl.full((), _NO_INDEX, tl.int32)

    out = row * num_chunks + chunk
    tl.store(raw_sum_ptr + out, raw_sum)
    tl.store(scaled_sum_ptr + out, scaled_sum)
    tl.store(greedy_ptr + out, greedy)
    tl.store(best_score_ptr + out, best)
    tl.store(best_id_ptr + out, best_id)


@triton.jit
def _finish_kernel(
    logits_ptr, candidates_ptr, candidate_ids_ptr,
    temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, counter_ptr,
    raw_sum_ptr, scaled_sum_ptr, greedy_ptr, best_score_ptr, best_id_ptr,
    tokens_ptr, logprobs_ptr,
    vocab, num_candidates, num_chunks, stride_logits_row, stride_candidates_row, stride_candidate_ids_row,
    CANDIDATES: tl.constexpr, CHUNKS: tl.constexpr,
):
    row = tl.program_id(0)
    candidates_row = candidates_ptr + row.to(tl.int64) * stride_candidates_row
    row_max = tl.load(candidates_row).to(tl.float32)
    sampled, inverse_temperature, min_p_threshold = _row_parameters(temperature_ptr, min_p_ptr, row, row_max)

    # The vocabulary pass's chunks, combined in chunk order.
    chunks = tl.arange(0, CHUNKS)
    chunk_mask = chunks < num_chunks
    parts = row * num_chunks + chunks
    raw_sum = tl.sum(tl.load(raw_sum_ptr + parts, mask=chunk_mask, other=0.0), axis=0)
    scaled_sum = tl.sum(tl.load(scaled_sum_ptr + parts, mask=chunk_mask, other=0.0), axis=0)
    greedy_token = tl.min(tl.load(greedy_ptr + parts, mask=chunk_mask, other=_NO_INDEX), axis=0)
    chunk_best = tl.load(best_score_ptr + parts, mask=chunk_mask, other=-float("inf"))
    full_best = tl.max(chunk_best, axis=0)
    chunk_best_id = tl.load(best_id_ptr + parts, mask=chunk_mask, other=_NO_INDEX)
    full_token = tl.min(tl.where(chunk_mask & (chunk_best == full_best), chunk_best_id, _NO_INDEX), axis=0)

    # Thresholds among the candidates: sample_reference._candidate_threshold.
    positions = tl.arange(0, CANDIDATES)
    valid = positions < num_candidates
    candidates = tl.load(candidates_row + positions, mask=valid, other=-float("inf")).to(tl.float32)
    candidate_ids = tl.load(candidate_ids_ptr + row.to(tl.int64) * stride_candidate_ids_row + positions, mask=valid, other=0)

    top_k = tl.load(top_k_ptr + row)
    top_k_on = top_k > 0
    kth = tl.minimum(tl.maximum(top_k, 1), num_candidates) - 1
    top_k_threshold = tl.where(top_k_on, tl.load(candidates_row + kth).to(tl.float32), -float("inf"))
    in_top_k = valid & (candidates >= top_k_threshold)

    scaled = (candidates - row_max) * inverse_temperature
    weights = tl.where(in_top_k, tl.exp(scaled), 0.0)
    normaliser = tl.where(top_k_on, tl.sum(weights, axis=0), scaled_sum)
    probabilities = weights / normaliser
    before = tl.cumsum(probabilities, axis=0) - probabilities
    top_p = tl.load(top_p_ptr + row)
    top_p_on = top_p < 1
    in_nucleus = in_top_k & (before < top_p)
    top_p_threshold = tl.where(top_p_on, tl.min(tl.where(in_nucleus, candidates, float("inf")), axis=0), -float("inf"))
    threshold = tl.maximum(tl.maximum(top_k_threshold, top_p_threshold), min_p_threshold)

    first_key, second_key = row_keys(seed_ptr, counter_ptr, row)
    scores = candidates * inverse_temperature + gumbel(first_key, second_key, candidate_ids)
    scores = tl.where(valid & (candidates >= threshold), scores, -float("inf"))
    best = tl.max(scores, axis=0)
    candidate_token = tl.min(tl.where(valid & (scores == best), candidate_ids, _NO_INDEX), axis=0)

    restricted = top_k_on | top_p_on
    token = tl.where(sampled, tl.where(restricted, candidate_token, full_token.to(tl.int64)), greedy_token.to(tl.int64))
    # Only NaN logits leave a reduction without a winner (the sentinel): the token is then meaningless, but it
    # stays a valid id, so neither this load nor the next step's embedding lookup reads out of bounds.
    token = tl.minimum(token, vocab - 1)
    x_token = tl.load(logits_ptr + row.to(tl.int64) * stride_logits_row + token).to(tl.float32)
    tl.store(tokens_ptr + row, token)
    tl.store(logprobs_ptr + row, x_token - row_max - tl.log(raw_sum))


def runs_in_interpreter() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 when they were decorated)."""
    return type(_vocabulary_pass_kernel).__name__ == "InterpretedFunction"


def sample_triton(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seed: torch.Tensor,
    counter: torch.Tensor,
    max_top_k: int,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample_reference`` computed by ``torch.topk`` and the two kernels: (tokens [rows] int64, logprobs
    [rows] float32). ``chunk_size`` (a power of two) is how much of a row one program of the vocabulary pass
    reads; the tests make it small to exercise many chunks on a small vocabulary."""
    rows, vocab = logits.shape
    device = logits.device
    tokens = torch.empty(rows, dtype=torch.int64, device=device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=device)
    if rows == 0:
        return tokens, logprobs
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    num_candidates = min(max_top_k, vocab)
    candidates, candidate_ids = torch.topk(logits, num_candidates, dim=-1)
    sizes = _launch_sizes(vocab, num_candidates, chunk_size)
    num_chunks = sizes["num_chunks"]

    raw_sum = torch.empty(rows, num_chunks, dtype=torch.float32, device=device)
    scaled_sum = torch.empty_like(raw_sum)
    best_score = torch.empty_like(raw_sum)
    greedy = torch.empty(rows, num_chunks, dtype=torch.int32, device=device)
    best_id = torch.empty_like(greedy)
    parameters = [_row_vector(t) for t in (temperature, top_k, top_p, min_p, seed, counter)]
    temperature, top_k, top_p, min_p, seed, counter = parameters

    _vocabulary_pass_kernel[(rows, num_chunks)](
        logits, candidates, temperature, top_k, top_p, min_p, seed, counter,
        raw_sum, scaled_sum, greedy, best_score, best_id,
        vocab, num_chunks, logits.stride(0), candidates.stride(0),
        CHUNK=chunk_size, num_warps=_VOCABULARY_PASS_WARPS,
    )
    _finish_kernel[(rows,)](
        logits, candidates, candidate_ids,
        temperature, top_k, top_p, min_p, seed, counter,
        raw_sum, scaled_sum, greedy, best_score, best_id,
        tokens, logprobs,
        vocab, num_candidates, num_chunks, logits.stride(0), candidates.stride(0), candidate_ids.stride(0),
        CANDIDATES=sizes["candidates_padded"], CHUNKS=sizes["chunks_padded"], num_warps=sizes["finish_warps"],
    )
    return tokens, logprobs


def _row_vector(tensor: torch.Tensor) -> torch.Tensor:
    # The runner's slot buffers are contiguous [rows] views already; anything else is made so (not in a graph's
    # steady state: a copy of a few bytes).
    return tensor if tensor.dim() == 1 and tensor.stride(0) == 1 else tensor.reshape(-1).contiguous()


@functools.cache
def _launch_sizes(vocab: int, num_candidates: int, chunk_size: int) -> dict[str, int]:
    """Chunk count and the finish kernel's padded sizes for one shape: worked out once, not per launch."""
    if chunk_size <= 0 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a positive power of two, got {chunk_size}")
    num_chunks = triton.cdiv(vocab, chunk_size)
    # At least 16 lanes: a one-element block (one chunk, one candidate) is legal but an odd layout to compile.
    candidates_padded = max(16, triton.next_power_of_2(num_candidates))
    return dict(
        num_chunks=num_chunks,
        chunks_padded=max(16, triton.next_power_of_2(num_chunks)),
        candidates_padded=candidates_padded,
        # One warp per 128 candidates: the finish kernel's cumsum and reductions are over one row's candidates.
        finish_warps=max(1, min(8, candidates_padded // 128)),
    )
