"""The Triton paged decode attention kernel computes exactly what the reference math defines.

On CPU it runs under Triton's interpreter (the project's conftest sets TRITON_INTERPRET=1 when CUDA is absent,
before this module imports the kernel); shapes stay tiny because the interpreter is slow. On CUDA it runs
compiled, including inside a captured CUDA graph whose inputs change between replays.
"""

from __future__ import annotations

import pytest
import torch

import graphhal.paged_attention.triton_decode_attention as triton_attention
from graphhal.paged_attention import decode_attention_reference
from support.paged_blocks import shuffled_block_tables

# Where a GPU is present the kernel is compiled for it and these CPU-tensor cases cannot run; where none is,
# conftest.py has switched the interpreter on, and a kernel that is not interpreted there must fail, not skip.
needs_interpreter = pytest.mark.skipif(
    torch.cuda.is_available() and not triton_attention.runs_in_interpreter(),
    reason="the kernel was compiled for a GPU; CPU tensors need TRITON_INTERPRET=1 set before it is imported",
)


def make_paged_batch(
    seq_lens: list[int],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    poison_unowned_slots: bool = False,
) -> dict:
    """Random q and caches, each row owning shuffled (non-contiguous) blocks, rows of seq_len 0 on block 0.

    With ``poison_unowned_slots`` every cache slot that no row attends to holds NaN, so any read past a row's
    seq_len (or into the null block) shows up in the result.
    """
    generator = torch.Generator().manual_seed(seed)
    blocks_per_row = [-(-n // block_size) for n in seq_lens]
    max_blocks = max(max(blocks_per_row), 1) + 1  # a spare column: tables are wider than any row needs
    num_blocks = 1 + sum(blocks_per_row)
    block_tables = shuffled_block_tables(blocks_per_row, max_blocks, num_blocks, generator)

    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(cache_shape, generator=generator)
    value_cache = torch.randn(cache_shape, generator=generator)
    if poison_unowned_slots:
        tokens = torch.arange(max_blocks * block_size)
        slots = block_tables.long().repeat_interleave(block_size, dim=1) * block_size + tokens % block_size
        attended = torch.zeros(num_blocks * block_size, dtype=torch.bool)
        attended[slots[tokens[None, :] < torch.tensor(seq_lens)[:, None]]] = True
        for cache in (key_cache, value_cache):
            cache.view(-1, num_kv_heads, head_dim)[~attended] = float("nan")

    def to_device(tensor: torch.Tensor, cast: bool = True) -> torch.Tensor:
        return tensor.to(device=device, dtype=dtype if cast else tensor.dtype)

    return dict(
        q=to_device(torch.randn(len(seq_lens), num_heads, head_dim, generator=generator)),
        key_cache=to_device(key_cache),
        value_cache=to_device(value_cache),
        block_tables=to_device(block_tables, cast=False),
        seq_lens=to_device(torch.tensor(seq_lens, dtype=torch.int32), cast=False),
        scale=head_dim**-0.5,
    )


def run_kernel(batch: dict) -> torch.Tensor:
    # NaN-filled, so any output element the kernel forgets to write fails the comparison.
    out = torch.full_like(batch["q"], float("nan"))
    triton_attention.paged_decode_attention(**batch, out=out)
    return out


# (seq_lens, num_heads, num_kv_heads, head_dim, block_size): GQA groups of 1, 2 and 4; lengths just under,
# at and over block boundaries; one over 128 tokens so the kernel's loop runs more than one tile; a head
# dim that is not a power of two; padded rows (seq_len 0) among live ones.
INTERPRETER_CASES = [
    ([1], 2, 2, 16, 4),
    ([3, 4, 5], 4, 2, 16, 4),
    ([0, 8, 9, 0], 4, 1, 16, 4),
    ([150, 2], 8, 2, 12, 4),
    ([16, 17, 0], 2, 1, 32, 16),
]


@pytest.mark.cpu
@needs_interpreter
@pytest.mark.parametrize("seq_lens, num_heads, num_kv_heads, head_dim, block_size", INTERPRETER_CASES)
def test_interpreted_kernel_matches_reference(seq_lens, num_heads, num_kv_heads, head_dim, block_size):
    batch = make_paged_batch(
        seq_lens, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size
    )
    torch.testing.assert_close(run_kernel(batch), decode_attention_reference(**batch), rtol=1e-5, atol=1e-5)


@pytest.mark.cpu
@needs_interpreter
def test_padded_rows_give_zeros_and_unowned_slots_are_never_read():
    batch = make_paged_batch(
        [0, 6, 0, 9], num_heads=4, num_kv_heads=2, head_dim=16, block_size=4, poison_unowned_slots=True
    )
    out = run_kernel(batch)
    assert torch.isfinite(out).all(), "the kernel read a slot past some row's seq_len (it held NaN)"
    assert torch.equal(out[[0, 2]], torch.zeros_like(out[[0, 2]])), "rows with seq_len 0 must be exactly zero"
    torch.testing.assert_close(out, decode_attention_reference(**batch), rtol=1e-5, atol=1e-5)


@pytest.mark.cpu
@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_interpreted_kernel_handles_half_precision(dtype):
    batch = make_paged_batch([5, 0, 11], num_heads=4, num_kv_heads=2, head_dim=16, block_size=4, dtype=dtype)
    out = run_kernel(batch)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), decode_attention_reference(**batch).float(), rtol=2e-2, atol=2e-2)


# CUDA: realistic sizes, many rows, long contexts.
CUDA_CASES = [
    ([1, 16, 17, 0, 300, 1000, 0, 33], 16, 8, 64, 16),
    ([2048] * 4 + [0] * 4, 32, 8, 128, 16),
    (list(range(0, 640, 10)), 16, 16, 64, 16),
    ([7, 0, 129, 64], 8, 1, 80, 32),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("seq_lens, num_heads, num_kv_heads, head_dim, block_size", CUDA_CASES)
def test_compiled_kernel_matches_reference(seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, tolerance):
    batch = make_paged_batch(
        seq_lens, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
        dtype=dtype, device="cuda", poison_unowned_slots=True,
    )
    out = run_kernel(batch)
    assert torch.isfinite(out).all()
    padded = torch.tensor(seq_lens, device="cuda") == 0
    assert torch.equal(out[padded], torch.zeros_like(out[padded]))
    expected = decode_attention_reference(**batch)
    torch.testing.assert_close(out.float(), expected.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.cuda
def test_kernel_replayed_from_a_cuda_graph_follows_new_seq_lens_and_block_tables():
    """Nothing about the captured batch is baked in: new lengths and tables in the same buffers are honoured."""
    shape = dict(num_heads=8, num_kv_heads=2, head_dim=64, block_size=16, device="cuda")
    captured = make_paged_batch([40, 0, 200, 16], **shape, seed=1)
    replayed = make_paged_batch([300, 17, 0, 1], **shape, seed=2)
    width = max(captured["block_tables"].shape[1], replayed["block_tables"].shape[1])
    num_blocks = max(captured["key_cache"].shape[0], replayed["key_cache"].shape[0])

    def widen(batch: dict) -> dict:
        """Pad tables and caches to one common size so both batches fit the same static buffers."""
        tables = torch.zeros(4, width, dtype=torch.int32, device="cuda")
        tables[:, : batch["block_tables"].shape[1]] = batch["block_tables"]
        caches = {}
        for name in ("key_cache", "value_cache"):
            cache = torch.zeros(num_blocks, *batch[name].shape[1:], device="cuda")
            cache[: batch[name].shape[0]] = batch[name]
            caches[name] = cache
        return {**batch, "block_tables": tables, **caches}

    captured, replayed = widen(captured), widen(replayed)
    static = {name: value.clone() if isinstance(value, torch.Tensor) else value for name, value in captured.items()}
    out = torch.empty_like(static["q"])
    triton_attention.paged_decode_attention(**static, out=out)  # compile outside the capture
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_attention.paged_decode_attention(**static, out=out)

    for batch in (replayed, captured):
        for name, value in batch.items():
            if isinstance(value, torch.Tensor):
                static[name].copy_(value)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, decode_attention_reference(**batch), rtol=1e-5, atol=1e-5)
