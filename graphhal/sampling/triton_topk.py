"""The sampler's candidates on CUDA: the K largest logits of each row, in two Triton passes.

    _chunk_top_kernel[(rows, chunks)]   # each chunk of a row: its K largest, as sortable 64-bit keys
    _merge_top_kernel[(rows,)]          # each row: the K largest of its chunks' K largest

``torch.topk`` took 111 us of the sampler's 157 us at 64 rows of a 128,256-token vocabulary on an H100 (its
radix selection makes several passes over each row, one block per row). Here the vocabulary is read once,
by as many programs as the vocabulary pass uses, and only ``chunks * K`` keys per row go to the merge.

A key packs a logit and its token id into one int64 that sorts as (logit descending, id ascending): the
high 32 bits are the float32 logit's bits made to order as signed integers, the low 32 bits ``2**31 - 1 - id``.
So a plain descending sort of keys is the order ``top_candidates`` in ``sample_reference`` defines, ties at
the K-th place included (the lowest ids enter), and the kernels and the torch reference pick the same set.
Graph-safe: no host reads; every size is a constexpr or a shape a runner's bucket fixes.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Logits of one row a program of the first pass reads: 4,096 (8 KiB of bf16), the vocabulary pass's chunk.
# A 128,256-token row is then 32 chunks, and the merge sorts 32 * 256 = 8,192 keys per row.
DEFAULT_CHUNK_SIZE = 4096
_SMALLEST_KEY = tl.constexpr(-(2**63))  # below every packed logit: fills the merge's padding


@triton.jit
def _packed_keys(x, ids):
    """(logit, id) -> int64 sorting as (logit descending, id ascending); ``_unpack`` inverts it."""
    bits = x.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip the magnitude bits so they sort as ints
    return (ordered.to(tl.int64) << 32) | (2147483647 - ids.to(tl.int64))


@triton.jit
def _largest_by_sort(keys, k: tl.constexpr):
    """The ``k`` largest of 1-D ``keys``, descending: a whole sort, then its first row of ``k``. For Triton
    before ``tl.topk`` (3.2, torch 2.6's), which sorts the same way but drops halves as it goes."""
    n: tl.constexpr = keys.shape[0]
    rows = tl.reshape(tl.sort(keys, descending=True), (n // k, k))
    first = tl.arange(0, n // k)[:, None] == 0
    return tl.sum(tl.where(first, rows, 0), axis=0)  # one nonzero term per column: exact in integers


_largest = tl.topk if hasattr(tl, "topk") else _largest_by_sort


@triton.jit
def _chunk_top_kernel(logits_ptr, keys_ptr, vocab, stride_logits_row, stride_keys_row, CHUNK: tl.constexpr, K: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    ids = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(logits_ptr + row.to(tl.int64) * stride_logits_row + ids, mask=ids < vocab, other=-float("inf"))
    top = _largest(_packed_keys(x.to(tl.float32), ids), K)
    tl.store(keys_ptr + row.to(tl.int64) * stride_keys_row + chunk * K + tl.arange(0, K), top)


@triton.jit
def _merge_top_kernel(
    keys_ptr, values_ptr, ids_ptr, num_keys, num_candidates, stride_keys_row, KEYS: tl.constexpr, K: tl.constexpr
):
    row = tl.program_id(0)
    positions = tl.arange(0, KEYS)
    keys = tl.load(keys_ptr + row.to(tl.int64) * stride_keys_row + positions, mask=positions < num_keys, other=_SMALLEST_KEY)
    top = _largest(keys, K)
    ordered = (top >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    slots = tl.arange(0, K)
    out = row.to(tl.int64) * num_candidates + slots
    tl.store(values_ptr + out, bits.to(tl.float32, bitcast=True), mask=slots < num_candidates)
    tl.store(ids_ptr + out, 2147483647 - (top & 2147483647), mask=slots < num_candidates)


def top_candidates_triton(
    logits: torch.Tensor, num_candidates: int, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample_reference.top_candidates`` on the GPU: (values [rows, num_candidates] float32, ids int64),
    sorted by value descending, ties by id ascending. ``chunk_size`` is a power of two; a chunk smaller than
    the candidates' padded count is widened to it."""
    rows, vocab = logits.shape
    if not 1 <= num_candidates <= vocab:
        raise ValueError(f"top_candidates_triton: num_candidates must be in 1..{vocab} (the vocabulary), got {num_candidates}")
    sizes = _launch_sizes(vocab, num_candidates, chunk_size)
    device = logits.device
    values = torch.empty(rows, num_candidates, dtype=torch.float32, device=device)
    ids = torch.empty(rows, num_candidates, dtype=torch.int64, device=device)
    if rows == 0:
        return values, ids
    keys = torch.empty(rows, sizes["num_keys"], dtype=torch.int64, device=device)
    _chunk_top_kernel[(rows, sizes["num_chunks"])](
        logits, keys, vocab, logits.stride(0), keys.stride(0), CHUNK=sizes["chunk"], K=sizes["k"], num_warps=8
    )
    _merge_top_kernel[(rows,)](
        keys, values, ids, sizes["num_keys"], num_candidates, keys.stride(0),
        KEYS=sizes["keys_padded"], K=sizes["k"], num_warps=sizes["merge_warps"],
    )
    return values, ids


@functools.cache
def _launch_sizes(vocab: int, num_candidates: int, chunk_size: int) -> dict[str, int]:
    if chunk_size <= 0 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a positive power of two, got {chunk_size}")
    k = triton.next_power_of_2(num_candidates)  # tl.topk takes a power of two; the extra slots are not stored
    chunk = max(chunk_size, k)
    num_chunks = triton.cdiv(vocab, chunk)
    num_keys = num_chunks * k
    keys_padded = triton.next_power_of_2(num_keys)
    # The merge holds its row's keys in registers: 8 warps up to 8,192 keys (32 int64 a thread), 16 beyond.
    return dict(k=k, chunk=chunk, num_chunks=num_chunks, num_keys=num_keys, keys_padded=keys_padded,
                merge_warps=8 if keys_padded <= 8192 else 16)
