"""The sampler's candidates on CUDA are ``top_candidates``'s: the same values and the same token ids, ties included.

On CPU the two kernels run under Triton's interpreter (conftest.py sets TRITON_INTERPRET=1 when CUDA is
absent); on CUDA compiled, at a real vocabulary. Logits drawn from a few integers make ties everywhere,
across the K-th place too, where ``torch.topk`` alone would list tied ids of its own choosing.
"""

from __future__ import annotations

import pytest
import torch

import graphhal.sampling.triton_sample as triton_sample
from graphhal.sampling.sample_reference import top_candidates
from graphhal.sampling.triton_topk import top_candidates_triton

needs_interpreter = pytest.mark.skipif(
    torch.cuda.is_available() and not triton_sample.runs_in_interpreter(),
    reason="the kernels were compiled for a GPU; CPU tensors need TRITON_INTERPRET=1 set before they are imported",
)


def tied_logits(rows: int, vocab: int, *, seed: int, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randint(-8, 8, (rows, vocab), generator=generator).to(dtype)
    logits[0, vocab // 2] = -torch.inf  # a masked token
    return logits.to(device)


def in_canonical_order(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted by value descending, then id ascending: the order the kernels write."""
    by_id = torch.sort(ids, dim=-1, stable=True)
    values, ids = values.gather(1, by_id.indices), by_id.values
    by_value = torch.sort(values.float(), dim=-1, descending=True, stable=True)
    return by_value.values, ids.gather(1, by_value.indices)


def assert_same_candidates(logits: torch.Tensor, count: int, chunk_size: int) -> None:
    values, ids = top_candidates_triton(logits, count, chunk_size=chunk_size)
    expected_values, expected_ids = in_canonical_order(*top_candidates(logits, count))
    assert values.dtype == torch.float32 and ids.dtype == torch.int64
    assert torch.equal(values, expected_values)
    assert torch.equal(ids, expected_ids)


# (rows, vocab, count, chunk_size): many chunks with a partial last one; the count not a power of two; the
# whole vocabulary; a chunk smaller than the padded count (widened to it); one row.
INTERPRETER_CASES = [(4, 600, 64, 128), (3, 777, 24, 64), (4, 50, 50, 16), (2, 300, 100, 32), (1, 2000, 256, 512)]


@needs_interpreter
@pytest.mark.parametrize("rows, vocab, count, chunk_size", INTERPRETER_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interpreted_kernels_pick_the_references_candidates(rows, vocab, count, chunk_size, dtype):
    assert_same_candidates(tied_logits(rows, vocab, seed=vocab, dtype=dtype), count, chunk_size)


@needs_interpreter
def test_ties_at_the_last_place_go_to_the_lowest_ids():
    logits = torch.zeros(1, 64)
    logits[0, [40, 50]] = 1.0
    values, ids = top_candidates_triton(logits, 5, chunk_size=16)
    assert ids.tolist() == [[40, 50, 0, 1, 2]] and values.tolist() == [[1.0, 1.0, 0.0, 0.0, 0.0]]
    reference_ids = top_candidates(logits, 5)[1][0].tolist()
    assert sorted(reference_ids[:2]) == [40, 50] and reference_ids[2:] == [0, 1, 2]


@needs_interpreter
def test_a_count_outside_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="num_candidates must be in 1..50"):
        top_candidates_triton(torch.zeros(2, 50), 51)


@pytest.mark.cuda
@pytest.mark.parametrize("rows, count", [(1, 256), (64, 256), (16, 50)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernels_pick_the_references_candidates(rows, count, dtype):
    assert_same_candidates(tied_logits(rows, 128_256, seed=rows, dtype=dtype, device="cuda"), count, 4096)
    logits = (torch.randn(rows, 128_256, generator=torch.Generator().manual_seed(rows)) * 3).to(dtype).cuda()
    assert_same_candidates(logits, count, 4096)
