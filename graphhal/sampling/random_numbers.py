"""Counter-based random numbers for sampling: a uniform number is a pure function of (seed, counter, token).

    u = uniform(seed, counter, vocabulary index)        # in (0, 1), exactly the same on every device
    g = -log(-log(u))                                   # its Gumbel noise

There is no generator and no state. ``seed`` is the request's, ``counter`` is how many tokens the request has
generated so far (the step its random numbers belong to), and the index is the token the number is for. Both
``seed`` and ``counter`` reach the device as input slots, so the values are read from device memory by the
captured kernels like any other input.

Why not torch's generators registered with the graph (what CUDA graphs offer, and what DESIGN.md once
planned): a registered generator gives reproducibility per *graph*, not per *request*.

- One generator feeds the whole batch: the numbers a row gets depend on its position in the batch, on how
  many rows are padded into the bucket (a bucket of 8 draws a different number of values than an eager batch
  of 5, so graph and eager tokens differ), and on every step the generator served before. A request whose
  neighbours change (another request finishes, one joins) gets different tokens. Per-request generators cannot
  be passed to one kernel (``torch.multinomial`` and ``Tensor.exponential_`` take one generator).
- Its state advances on every replay, including warm-ups, retries and a step re-run after an abort: replaying
  a step is not idempotent.
- Registration is CUDA's (``CUDAGraph.register_generator_state``): the cpu recorded graph and NPU graphs
  would each need their own equivalent, and eager runs yet another.

The counter-based numbers have none of these: a row's numbers are those of its own (seed, counter), whatever
else is in the batch, wherever the row sits, in any mode, however often the step is replayed; the uniforms
themselves are bit-identical on every device. A request resumed after preemption, or moved to another server
of the same device kind, draws the same tokens. Across devices the tokens can differ: the Gumbel noise takes
two logs (Triton's ``tl.log`` on CUDA, ``torch.log`` elsewhere) and the model's logits round differently, so
a draw near a tie may go the other way. The price is a hash per vocabulary entry: about twenty integer
operations, fused into the pass that already reads the logits.

The hash. Every step is ``lowbias32`` (Chris Wellons' hash-prospector: xor-shift, multiply, xor-shift,
multiply, xor-shift; a bijection of 32-bit words with low avalanche bias), with the inputs xored in between
and a distinct odd constant at each injection so that zeros (a fixed point of the mixer) do not propagate:

    k1 = mix(mix(mix(mix(seed_lo ^ C0) ^ seed_hi ^ C1) ^ counter_lo ^ C2) ^ counter_hi ^ C3)   # per row
    k2 = mix(k1 ^ C4)                                                                            # per row
    h  = mix(mix(index ^ k1) ^ k2)                                                              # per token
    u  = (2 * (h >> 9) + 1) * 2**-24

Two rounds per token, keyed twice: with one round, ``mix(index ^ k1)``, two rows whose keys differ only in
their low 17 bits would draw, over a 128K vocabulary, nearly the same *set* of numbers, only permuted among
the tokens; the second key breaks that. It is not cryptographic and not Philox (ten rounds of 32x32->64-bit
multiplies per four numbers, what torch uses): for drawing one token from a categorical distribution, what
matters is what tests/test_sampling.py checks (frequencies against ``torch.multinomial`` and transformers'
warpers, uniformity, no correlation across neighbouring counters and seeds).

``u`` has 23 random bits and is exact in float32: an odd multiple of 2**-24, so never 0 or 1 and the Gumbel
noise is always finite (between -2.81 and 16.6). A token whose scaled logit trails the best by more than
19.4 (a probability ratio under 4e-9) can therefore never be drawn.

torch has no 32-bit unsigned arithmetic that wraps, so here the words live in int64 tensors, in [0, 2**32),
and every product stays below 2**63 (``_multiply_low32``); the Triton twin
(``graphhal.sampling.triton_random``) uses uint32 arithmetic, which wraps. Both produce the same bits.
"""

from __future__ import annotations

import torch

# Odd constants injected with each input word (golden ratio, murmur3's and xxhash's primes).
SEED_LOW_KEY = 0x9E3779B9
SEED_HIGH_KEY = 0x85EBCA6B
COUNTER_LOW_KEY = 0xC2B2AE35
COUNTER_HIGH_KEY = 0x27D4EB2F
SECOND_KEY = 0x165667B1
# lowbias32's multipliers.
MIX_MULTIPLIER_1 = 0x7FEB352D
MIX_MULTIPLIER_2 = 0x846CA68B
# u = (2 * (h >> UNIFORM_SHIFT) + 1) * UNIFORM_SCALE: 23 random bits, an odd multiple of 2**-24.
UNIFORM_SHIFT = 9
UNIFORM_SCALE = 2.0**-24

_LOW32 = 0xFFFFFFFF
_TOP_BIT = 1 << 31


def _multiply_low32(words: torch.Tensor, constant: int) -> torch.Tensor:
    """``words * constant mod 2**32`` for int64 ``words`` in [0, 2**32), every intermediate below 2**63.

    A word times a constant below 2**31 fits int64. A constant's top bit (2**31) adds ``word << 31``, of which
    only the word's lowest bit survives mod 2**32: so the top bit is added as that bit, shifted.
    """
    if constant < _TOP_BIT:
        return (words * constant) & _LOW32
    return (words * (constant - _TOP_BIT) + ((words & 1) << 31)) & _LOW32


def mix32(words: torch.Tensor) -> torch.Tensor:
    """lowbias32 of each 32-bit word (int64 tensor, values in [0, 2**32)); same range out."""
    words = words ^ (words >> 16)
    words = _multiply_low32(words, MIX_MULTIPLIER_1)
    words = words ^ (words >> 15)
    words = _multiply_low32(words, MIX_MULTIPLIER_2)
    return words ^ (words >> 16)


def _low_and_high_words(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values = values.to(torch.int64)
    return values & _LOW32, (values >> 32) & _LOW32  # >> is arithmetic: masked, a negative seed is its bits


def row_keys(seed: torch.Tensor, counter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's two 32-bit keys (int64 tensors shaped like ``seed``) from its int64 seed and counter."""
    seed_low, seed_high = _low_and_high_words(seed)
    counter_low, counter_high = _low_and_high_words(counter)
    key = mix32(seed_low ^ SEED_LOW_KEY)
    key = mix32(key ^ seed_high ^ SEED_HIGH_KEY)
    key = mix32(key ^ counter_low ^ COUNTER_LOW_KEY)
    first = mix32(key ^ counter_high ^ COUNTER_HIGH_KEY)
    return first, mix32(first ^ SECOND_KEY)


def uniforms(seed: torch.Tensor, counter: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in (0, 1) for each row's (seed, counter) [rows] and token ``indices`` [rows, n] (or [n],
    the same indices for every row): [rows, n], bit-identical on every device and in the Triton kernels."""
    first, second = row_keys(seed, counter)
    indices = indices.to(torch.int64)
    if indices.dim() == 1:
        indices = indices.unsqueeze(0)
    words = mix32(mix32(indices ^ first.unsqueeze(-1)) ^ second.unsqueeze(-1))
    # An odd integer below 2**24 converts to float32 exactly, and scaling by a power of two is exact.
    return ((words >> UNIFORM_SHIFT) * 2 + 1).to(torch.float32) * UNIFORM_SCALE


def gumbel_noise(seed: torch.Tensor, counter: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Gumbel noise ``-log(-log(u))`` for ``uniforms(seed, counter, indices)``, float32."""
    return -torch.log(-torch.log(uniforms(seed, counter, indices)))
