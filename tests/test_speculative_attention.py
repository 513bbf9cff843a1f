"""Decode attention over several query tokens per request (a speculative verify step), on every kernel.

Token ``i`` of a request with ``q`` new tokens is the ``i``-th of its last ``q`` cached tokens, so it must attend
exactly as a one-token step over the first ``seq_len - (q - 1 - i)`` tokens would: that is the definition the
reference is checked against here, and every kernel (cpu, Triton under its interpreter or on a GPU, the npu's
fused op on the simulator) is checked against the reference, padded requests (``seq_len`` 0) included.
"""

from __future__ import annotations

import pytest
import torch

import graphhal.paged_attention.triton_decode_attention as triton_attention
from graphhal.paged_attention import decode_attention, decode_attention_reference, npu_decode_attention
from support.npu_simulator.fixture import npu_simulated_on_cpu
from support.paged_blocks import shuffled_block_tables

needs_interpreter = pytest.mark.skipif(
    torch.cuda.is_available() and not triton_attention.runs_in_interpreter(),
    reason="the kernel was compiled for a GPU; CPU tensors need TRITON_INTERPRET=1 set before it is imported",
)

# (seq_lens, query_tokens, num_heads, num_kv_heads, head_dim, block_size): padded requests (0), a request
# whose new tokens cross a block boundary, GQA groups of 1, 2 and 4, one context over one Triton tile.
CASES = [
    ([5, 0, 17, 9], 2, 4, 2, 16, 4),
    ([3, 8, 0, 0, 12], 3, 2, 2, 8, 8),
    ([4, 33, 6], 4, 8, 2, 32, 16),
    ([150, 5, 0], 5, 4, 1, 16, 16),
]


def paged_batch(
    seq_lens: list[int], query_tokens: int, *, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
    dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
) -> dict:
    """Random q [requests, query_tokens, heads, head_dim] and caches, each request owning shuffled blocks; the
    slots no request attends to hold NaN, so a read past a request's length shows in the result."""
    generator = torch.Generator().manual_seed(seed)
    blocks_per_row = [-(-n // block_size) for n in seq_lens]
    max_blocks = max(max(blocks_per_row), 1) + 1
    num_blocks = 1 + sum(blocks_per_row)
    block_tables = shuffled_block_tables(blocks_per_row, max_blocks, num_blocks, generator)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache, value_cache = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    tokens = torch.arange(max_blocks * block_size)
    slots = block_tables.long().repeat_interleave(block_size, dim=1) * block_size + tokens % block_size
    attended = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    attended[slots[tokens[None, :] < torch.tensor(seq_lens)[:, None]]] = True
    for cache in (key_cache, value_cache):
        cache.view(-1, num_kv_heads, head_dim)[~attended] = float("nan")
    q = torch.randn(len(seq_lens), query_tokens, num_heads, head_dim, generator=generator)
    return dict(
        q=q.to(device, dtype),
        key_cache=key_cache.to(device, dtype),
        value_cache=value_cache.to(device, dtype),
        block_tables=block_tables.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        scale=head_dim**-0.5,
    )


def one_token_at_a_time(batch: dict) -> torch.Tensor:
    """The definition: query token i attends as a one-token step over its request's first seq_len - (q-1-i)."""
    q = batch["q"]
    query_tokens = q.shape[1]
    outputs = []
    for i in range(query_tokens):
        lengths = (batch["seq_lens"].long() - (query_tokens - 1 - i)).clamp_min(0).to(torch.int32)
        outputs.append(decode_attention_reference(**{**batch, "q": q[:, i], "seq_lens": lengths}))
    return torch.stack(outputs, dim=1)


def nan_out(batch: dict) -> torch.Tensor:
    return torch.full_like(batch["q"], float("nan"))  # an element a kernel forgets to write fails the comparison


@pytest.mark.parametrize("seq_lens, query_tokens, num_heads, num_kv_heads, head_dim, block_size", CASES)
def test_reference_attends_each_query_token_causally(seq_lens, query_tokens, num_heads, num_kv_heads, head_dim, block_size):
    batch = paged_batch(seq_lens, query_tokens, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size)
    result = decode_attention_reference(**batch)
    assert result.shape == batch["q"].shape and torch.isfinite(result).all()
    torch.testing.assert_close(result, one_token_at_a_time(batch))
    padded = torch.tensor(seq_lens) == 0
    assert (result[padded] == 0).all()  # a padded request attends to nothing


@pytest.mark.cpu
@pytest.mark.parametrize("seq_lens, query_tokens, num_heads, num_kv_heads, head_dim, block_size", CASES)
def test_cpu_kernel_equals_reference(seq_lens, query_tokens, num_heads, num_kv_heads, head_dim, block_size):
    batch = paged_batch(seq_lens, query_tokens, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size)
    out = nan_out(batch)
    decode_attention(**batch, out=out)  # the custom op, dispatched to its cpu kernel
    torch.testing.assert_close(out, decode_attention_reference(**batch))


@pytest.mark.cpu
def test_cpu_kernel_gives_zeros_to_tokens_whose_causal_length_is_zero():
    """A request shorter than its query tokens (seq_len < q) cannot come from a server, but stays finite."""
    batch = paged_batch([2, 7], 4, num_heads=2, num_kv_heads=1, head_dim=8, block_size=4)
    out = nan_out(batch)
    decode_attention(**batch, out=out)
    torch.testing.assert_close(out, decode_attention_reference(**batch))
    assert (out[0, :2] == 0).all() and torch.isfinite(out).all()


@needs_interpreter
@pytest.mark.parametrize("seq_lens, query_tokens, num_heads, num_kv_heads, head_dim, block_size", CASES)
def test_triton_kernel_equals_reference(seq_lens, query_tokens, num_heads, num_kv_heads, head_dim, block_size):
    batch = paged_batch(seq_lens, query_tokens, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size)
    out = nan_out(batch)
    triton_attention.paged_decode_attention(**batch, out=out)
    torch.testing.assert_close(out, decode_attention_reference(**batch), atol=2e-5, rtol=2e-5)


@needs_interpreter
def test_triton_kernel_reads_strided_query_tokens():
    """The model hands the op views of its rotated block: q and out need not be contiguous."""
    batch = paged_batch([6, 11], 3, num_heads=2, num_kv_heads=2, head_dim=16, block_size=4)
    wide = torch.randn(2, 3, 5, 16)
    wide[:, :, 1:3] = batch["q"]
    batch["q"] = wide[:, :, 1:3]
    out = torch.full((2, 3, 4, 16), float("nan"))[:, :, :2]
    triton_attention.paged_decode_attention(**batch, out=out)
    torch.testing.assert_close(out, decode_attention_reference(**batch), atol=2e-5, rtol=2e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq_lens, query_tokens, num_heads, num_kv_heads, head_dim, block_size", CASES)
def test_cuda_kernel_equals_reference(seq_lens, query_tokens, num_heads, num_kv_heads, head_dim, block_size, dtype):
    batch = paged_batch(
        seq_lens, query_tokens, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
        dtype=dtype, device="cuda",
    )
    out = nan_out(batch)
    decode_attention(**batch, out=out)
    tolerance = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, decode_attention_reference(**batch), **tolerance)


@pytest.mark.cuda
def test_cuda_kernel_in_a_cuda_graph_follows_new_lengths():
    """Captured once, replayed with other lengths, block tables and caches: nothing of a batch is baked in."""
    # The same lengths in another order: the same cache and table sizes, every request's length changed.
    first = paged_batch([9, 0, 20], 3, num_heads=4, num_kv_heads=2, head_dim=32, block_size=16, device="cuda", seed=1)
    second = paged_batch([20, 9, 0], 3, num_heads=4, num_kv_heads=2, head_dim=32, block_size=16, device="cuda", seed=2)
    static = {name: value.clone() if isinstance(value, torch.Tensor) else value for name, value in first.items()}
    out = torch.empty_like(static["q"])
    triton_attention.paged_decode_attention(**static, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_attention.paged_decode_attention(**static, out=out)
    for batch in (second, first):
        for name in ("q", "key_cache", "value_cache", "block_tables", "seq_lens"):
            static[name].copy_(batch[name])
        graph.replay()
        torch.testing.assert_close(out, decode_attention_reference(**batch), atol=2e-5, rtol=2e-5)


@pytest.mark.cpu
@pytest.mark.parametrize("query_tokens", [2, 4])
def test_npu_fused_attention_on_the_simulator_equals_reference(query_tokens):
    """The npu kernel: torch_npu's fused infer-attention op, BSH with S = q and sparse_mode 3 (SIMULATED); a
    padded row has the length q (its own tokens), which the simulator takes (it refuses a length below S)."""
    batch = paged_batch([20, query_tokens, 37], query_tokens, num_heads=4, num_kv_heads=2, head_dim=16, block_size=16, dtype=torch.bfloat16)
    expected = decode_attention_reference(**batch)
    with npu_simulated_on_cpu():
        out = torch.zeros_like(batch["q"])
        npu_decode_attention.decode_attention_npu(**batch, out=out)
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
