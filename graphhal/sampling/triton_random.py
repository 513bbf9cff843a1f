"""The counter-based random numbers of ``graphhal.sampling.random_numbers``, in Triton: the hash the sampler's
kernels (``triton_sample``) inline to draw each token's Gumbel noise, bit for bit what the torch twin computes
(uint32 arithmetic, which wraps, where torch masks int64), and a kernel that writes the uniforms out for the
tests to compare.

This module imports triton at import time: only ``triton_sample`` and the tests import it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from graphhal.sampling import random_numbers as rn

# The hash's constants, from its torch twin: one definition for both.
_SEED_LOW_KEY = tl.constexpr(rn.SEED_LOW_KEY)
_SEED_HIGH_KEY = tl.constexpr(rn.SEED_HIGH_KEY)
_COUNTER_LOW_KEY = tl.constexpr(rn.COUNTER_LOW_KEY)
_COUNTER_HIGH_KEY = tl.constexpr(rn.COUNTER_HIGH_KEY)
_SECOND_KEY = tl.constexpr(rn.SECOND_KEY)
_MIX_MULTIPLIER_1 = tl.constexpr(rn.MIX_MULTIPLIER_1)
_MIX_MULTIPLIER_2 = tl.constexpr(rn.MIX_MULTIPLIER_2)
_UNIFORM_SHIFT = tl.constexpr(rn.UNIFORM_SHIFT)
_UNIFORM_SCALE = tl.constexpr(rn.UNIFORM_SCALE)


@triton.jit
def _mix32(words):
    """lowbias32 on uint32 words (wrapping multiplies): ``random_numbers.mix32``."""
    words ^= words >> 16
    words *= _MIX_MULTIPLIER_1
    words ^= words >> 15
    words *= _MIX_MULTIPLIER_2
    words ^= words >> 16
    return words


@triton.jit
def row_keys(seed_ptr, counter_ptr, row):
    """The row's two keys from its int64 seed and counter: ``random_numbers.row_keys``."""
    seed = tl.load(seed_ptr + row)
    counter = tl.load(counter_ptr + row)
    seed_low = (seed & 0xFFFFFFFF).to(tl.uint32)
    seed_high = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    counter_low = (counter & 0xFFFFFFFF).to(tl.uint32)
    counter_high = ((counter >> 32) & 0xFFFFFFFF).to(tl.uint32)
    key = _mix32(seed_low ^ _SEED_LOW_KEY)
    key = _mix32(key ^ seed_high ^ _SEED_HIGH_KEY)
    key = _mix32(key ^ counter_low ^ _COUNTER_LOW_KEY)
    first = _mix32(key ^ counter_high ^ _COUNTER_HIGH_KEY)
    return first, _mix32(first ^ _SECOND_KEY)


@triton.jit
def _uniforms(first_key, second_key, token_ids):
    """Uniforms in (0, 1) for int32/int64 token ids: ``random_numbers.uniforms``."""
    words = _mix32(_mix32(token_ids.to(tl.uint32) ^ first_key) ^ second_key)
    return ((words >> _UNIFORM_SHIFT) * 2 + 1).to(tl.float32) * _UNIFORM_SCALE


@triton.jit
def gumbel(first_key, second_key, token_ids):
    return -tl.log(-tl.log(_uniforms(first_key, second_key, token_ids)))



@triton.jit
def _uniforms_kernel(seed_ptr, counter_ptr, out_ptr, count, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    first_key, second_key = row_keys(seed_ptr, counter_ptr, row)
    ids = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + row.to(tl.int64) * count + ids, _uniforms(first_key, second_key, ids), mask=ids < count)


def uniforms_triton(seed: torch.Tensor, counter: torch.Tensor, count: int) -> torch.Tensor:
    """The uniforms the kernels draw for tokens ``0..count-1`` of each row's (seed, counter): [rows, count]
    float32. What ``random_numbers.uniforms`` computes in torch, bit for bit (the tests check it)."""
    seed, counter = seed.reshape(-1).contiguous(), counter.reshape(-1).contiguous()
    out = torch.empty(seed.shape[0], count, dtype=torch.float32, device=seed.device)
    block = 1024
    if seed.shape[0] and count:
        _uniforms_kernel[(seed.shape[0], triton.cdiv(count, block))](seed, counter, out, count, BLOCK=block)
    return out
