"""The graph-safe prefill attention kernels compute exactly what the token-by-token reference defines.

Two kernels read no length on the host, so a whole prefill step can be captured around them: the Triton
kernel (CUDA; on CPU through Triton's interpreter, which the project's conftest switches on when CUDA is
absent, before this module imports the kernel) and the masked torch version (CPU, and any device). Both are
held to ``prefill_attention_reference`` over packed batches with padding requests anywhere, padded token rows
at the end, contexts from none to several blocks, shuffled block tables, GQA groups of 1 to 4 (and 3),
head dims that are not powers of two, and several block sizes. Interpreted shapes stay small: the
interpreter is slow.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode

import graphhal.paged_attention.triton_prefill_attention as triton_prefill
from graphhal.paged_attention.prefill_attention_masked import prefill_attention_masked
from graphhal.paged_attention.prefill_attention_reference import prefill_attention_reference
from support.paged_blocks import shuffled_block_tables

# Where a GPU is present the kernel is compiled for it and these CPU-tensor cases cannot run; where none is,
# conftest.py has switched the interpreter on, and a kernel that is not interpreted there must fail, not skip.
needs_interpreter = pytest.mark.skipif(
    torch.cuda.is_available() and not triton_prefill.runs_in_interpreter(),
    reason="the kernel was compiled for a GPU; CPU tensors need TRITON_INTERPRET=1 set before it is imported",
)


def make_prefill_batch(
    query_lens: list[int],
    context_lens: list[int],
    *,
    padded_tokens: int = 0,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    poison_unowned_slots: bool = False,
    max_blocks: int | None = None,
    num_blocks: int | None = None,
) -> dict:
    """A packed batch: random q (padded token rows too) and caches; live requests own shuffled blocks.

    Request ``i`` has ``query_lens[i]`` new tokens after ``context_lens[i]`` cached ones. A padding request
    (query_len 0) keeps ``seq_len = context_lens[i]``, a value attention must ignore, and a table of the null
    block 0. Tables get a spare column (no request fills its row); ``max_blocks`` and ``num_blocks`` widen
    tables and caches further, so batches of different splits fit the same buffers. With
    ``poison_unowned_slots`` every cache slot no live request attends to holds NaN (the null block, blocks no
    one owns, owned slots past seq_len), so any read there shows up in the result.
    """
    generator = torch.Generator().manual_seed(seed)
    seq_lens = [query + context for query, context in zip(query_lens, context_lens)]
    blocks_per_request = [-(-seq // block_size) if query else 0 for query, seq in zip(query_lens, seq_lens)]
    max_blocks = max(max_blocks or 0, max(blocks_per_request, default=0) + 1)
    num_blocks = max(num_blocks or 0, 1 + sum(blocks_per_request))
    block_tables = shuffled_block_tables(blocks_per_request, max_blocks, num_blocks, generator)

    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(cache_shape, generator=generator)
    value_cache = torch.randn(cache_shape, generator=generator)
    if poison_unowned_slots:
        attended = torch.zeros(num_blocks * block_size, dtype=torch.bool)
        for request, (query, seq) in enumerate(zip(query_lens, seq_lens)):
            if query:
                positions = torch.arange(seq)
                blocks = block_tables[request].long()[positions // block_size]
                attended[blocks * block_size + positions % block_size] = True
        for cache in (key_cache, value_cache):
            cache.view(-1, num_kv_heads, head_dim)[~attended] = float("nan")

    def to_device(tensor: torch.Tensor, cast: bool = True) -> torch.Tensor:
        return tensor.to(device=device, dtype=dtype if cast else tensor.dtype)

    num_tokens = sum(query_lens) + padded_tokens
    return dict(
        q=to_device(torch.randn(num_tokens, num_heads, head_dim, generator=generator)),
        key_cache=to_device(key_cache),
        value_cache=to_device(value_cache),
        block_tables=to_device(block_tables, cast=False),
        query_lens=to_device(torch.tensor(query_lens, dtype=torch.int32), cast=False),
        seq_lens=to_device(torch.tensor(seq_lens, dtype=torch.int32), cast=False),
        scale=head_dim**-0.5,
    )


def random_split(seed: int, *, num_requests: int, max_query_len: int, max_context_len: int, max_padded: int) -> dict:
    """query_lens, context_lens and padded_tokens of a random packed batch, a third of its requests padding."""
    rng = random.Random(seed)
    query_lens = [0 if rng.random() < 1 / 3 else rng.randint(1, max_query_len) for _ in range(num_requests)]
    context_lens = [rng.randint(0, max_context_len) for _ in range(num_requests)]
    return dict(query_lens=query_lens, context_lens=context_lens, padded_tokens=rng.randint(0, max_padded))


def run_triton(batch: dict) -> torch.Tensor:
    # NaN-filled, so any output element the kernel forgets to write (a padded row included) fails the comparison.
    out = torch.full_like(batch["q"], float("nan"))
    triton_prefill.paged_prefill_attention(**batch, out=out)
    return out


def padded_rows(batch: dict) -> slice:
    return slice(int(batch["query_lens"].sum()), batch["q"].shape[0])


def tolerance(dtype: torch.dtype, device: str = "cpu") -> dict[str, float]:
    if dtype == torch.bfloat16:
        return dict(rtol=2e-2, atol=2e-2)
    if dtype == torch.float16:
        return dict(rtol=5e-3, atol=5e-3)
    return dict(rtol=1e-5, atol=1e-5) if device == "cpu" else dict(rtol=1e-4, atol=1e-4)


# (num_heads, num_kv_heads, head_dim, block_size): GQA groups of 1, 2, 4 and 3 (not a power of two); head
# dims of 64 and of 48 and 80 (padded to 64 and 128 inside the Triton kernel); blocks of 8, 16 and 32 tokens.
SHAPES = [
    pytest.param(4, 4, 64, 16, id="mha-d64-bs16"),
    pytest.param(4, 2, 48, 8, id="gqa2-d48-bs8"),
    pytest.param(8, 2, 80, 16, id="gqa4-d80-bs16"),
    pytest.param(6, 2, 64, 32, id="gqa3-d64-bs32"),
]

# (query_lens, context_lens, padded_tokens): requests longer than a query tile (float32 tiles of the Triton
# kernel hold 8 to 32 tokens, the masked version's 16) and contexts longer than a key tile (32 keys in
# float32), so both loop; padding requests first, in the middle (with a stale seq_len) and last; one-token
# requests after long contexts; a batch without padded rows; a batch of padding only.
SPLITS = [
    pytest.param([5, 0, 40, 3], [2, 9, 50, 0], 7, id="mixed"),
    pytest.param([0, 17, 1, 0], [0, 0, 33, 5], 3, id="padding-first-and-last"),
    pytest.param([40], [0], 0, id="one-request-no-context-no-padding"),
    pytest.param([1, 1, 1], [0, 31, 64], 1, id="decode-like"),
    pytest.param([0, 0], [3, 0], 5, id="padding-only"),
]


# --- the Triton kernel, interpreted on CPU ----------------------------------------------------------------


@pytest.mark.cpu
@needs_interpreter
@pytest.mark.parametrize("query_lens, context_lens, padded_tokens", SPLITS)
def test_interpreted_kernel_matches_reference(query_lens, context_lens, padded_tokens):
    batch = make_prefill_batch(
        query_lens, context_lens, padded_tokens=padded_tokens, num_heads=4, num_kv_heads=2, head_dim=48, block_size=16
    )
    torch.testing.assert_close(run_triton(batch), prefill_attention_reference(**batch), **tolerance(torch.float32))


@pytest.mark.cpu
@needs_interpreter
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, block_size", SHAPES)
def test_interpreted_kernel_matches_reference_for_random_splits(num_heads, num_kv_heads, head_dim, block_size):
    split = random_split(head_dim + block_size, num_requests=5, max_query_len=30, max_context_len=50, max_padded=9)
    batch = make_prefill_batch(
        **split, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size
    )
    torch.testing.assert_close(run_triton(batch), prefill_attention_reference(**batch), **tolerance(torch.float32))


@pytest.mark.cpu
@needs_interpreter
def test_interpreted_kernel_zeroes_padded_rows_and_reads_no_slot_past_seq_len():
    batch = make_prefill_batch(
        [6, 0, 19, 0], [3, 40, 21, 0], padded_tokens=5, num_heads=4, num_kv_heads=2, head_dim=16, block_size=4,
        poison_unowned_slots=True,
    )
    out = run_triton(batch)
    assert torch.isfinite(out).all(), "the kernel read a slot past some request's seq_len (it held NaN)"
    padded = padded_rows(batch)
    assert torch.equal(out[padded], torch.zeros_like(out[padded])), "padded token rows must be exactly zero"
    torch.testing.assert_close(out, prefill_attention_reference(**batch), **tolerance(torch.float32))


@pytest.mark.cpu
@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_interpreted_kernel_handles_half_precision(dtype):
    batch = make_prefill_batch(
        [5, 0, 70, 3], [2, 9, 100, 0], padded_tokens=4, num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
        dtype=dtype,
    )
    out = run_triton(batch)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), prefill_attention_reference(**batch).float(), **tolerance(dtype))


@pytest.mark.cpu
@needs_interpreter
def test_interpreted_kernel_handles_an_empty_batch_and_no_requests():
    empty = make_prefill_batch([0, 0], [0, 0], num_heads=2, num_kv_heads=1, head_dim=16, block_size=4)
    assert run_triton(empty).shape == (0, 2, 16)
    no_requests = make_prefill_batch([], [], padded_tokens=3, num_heads=2, num_kv_heads=1, head_dim=16, block_size=4)
    assert torch.equal(run_triton(no_requests), torch.zeros(3, 2, 16))


# --- the masked torch version ----------------------------------------------------------------------------


@pytest.mark.cpu
@pytest.mark.parametrize("query_lens, context_lens, padded_tokens", SPLITS)
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, block_size", SHAPES)
def test_masked_matches_reference(
    query_lens, context_lens, padded_tokens, num_heads, num_kv_heads, head_dim, block_size
):
    batch = make_prefill_batch(
        query_lens, context_lens, padded_tokens=padded_tokens,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
    )
    expected = prefill_attention_reference(**batch)
    torch.testing.assert_close(prefill_attention_masked(**batch), expected, **tolerance(torch.float32))


@pytest.mark.cpu
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, block_size", SHAPES)
def test_masked_matches_reference_for_random_splits(seed, num_heads, num_kv_heads, head_dim, block_size):
    split = random_split(seed, num_requests=7, max_query_len=50, max_context_len=120, max_padded=20)
    batch = make_prefill_batch(
        **split, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size, seed=seed
    )
    expected = prefill_attention_reference(**batch)
    torch.testing.assert_close(prefill_attention_masked(**batch), expected, **tolerance(torch.float32))


@pytest.mark.cpu
def test_masked_zeroes_padded_rows_and_ignores_unwritten_slots():
    batch = make_prefill_batch(
        [6, 0, 19, 0], [3, 40, 21, 0], padded_tokens=5, num_heads=4, num_kv_heads=2, head_dim=16, block_size=4,
        poison_unowned_slots=True,
    )
    out = prefill_attention_masked(**batch)
    assert torch.isfinite(out).all(), "a NaN in a slot past some request's seq_len reached the result"
    padded = padded_rows(batch)
    assert torch.equal(out[padded], torch.zeros_like(out[padded])), "padded token rows must be exactly zero"
    torch.testing.assert_close(out, prefill_attention_reference(**batch), **tolerance(torch.float32))


@pytest.mark.cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_masked_handles_half_precision(dtype):
    batch = make_prefill_batch(
        [5, 0, 70, 3], [2, 9, 100, 0], padded_tokens=4, num_heads=8, num_kv_heads=2, head_dim=80, block_size=16,
        dtype=dtype,
    )
    out = prefill_attention_masked(**batch)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), prefill_attention_reference(**batch).float(), **tolerance(dtype))


@pytest.mark.cpu
def test_masked_handles_an_empty_batch_and_no_requests():
    empty = make_prefill_batch([0, 0], [0, 0], num_heads=2, num_kv_heads=1, head_dim=16, block_size=4)
    assert prefill_attention_masked(**empty).shape == (0, 2, 16)
    no_requests = make_prefill_batch([], [], padded_tokens=3, num_heads=2, num_kv_heads=1, head_dim=16, block_size=4)
    assert torch.equal(prefill_attention_masked(**no_requests), torch.zeros(3, 2, 16))


@pytest.mark.cpu
def test_masked_reads_nothing_on_the_host():
    """Under FakeTensorMode tensors hold no data: a host read (.item(), .tolist(), a bool of a tensor) or a shape
    that depends on values (nonzero, boolean masks) raises. The masked version runs through; the reference,
    which reads the lengths on the host, does not (so the check has teeth)."""
    batch = make_prefill_batch(
        [5, 0, 30, 3], [2, 9, 40, 0], padded_tokens=6, num_heads=4, num_kv_heads=2, head_dim=16, block_size=4
    )
    mode = FakeTensorMode()
    fake = {name: mode.from_tensor(value) if isinstance(value, torch.Tensor) else value for name, value in batch.items()}
    with mode:
        out = prefill_attention_masked(**fake)
        assert out.shape == batch["q"].shape and out.dtype == batch["q"].dtype
        with pytest.raises((DataDependentOutputException, DynamicOutputShapeException)):
            prefill_attention_reference(**fake)


# --- on CUDA: compiled kernel, the masked version on a GPU, and both captured in a CUDA graph ---------------

# Realistic sizes: long prompts after long contexts, a prompt of one token, padding requests, padded rows.
CUDA_CASES = [
    pytest.param([512, 0, 1, 300, 17], [0, 5, 1000, 64, 2000], 13, 32, 8, 128, 16, id="mixed-gqa4-d128"),
    pytest.param([2048], [0], 0, 16, 8, 64, 16, id="long-prompt"),
    pytest.param([0, 129, 0, 64, 7], [4, 250, 0, 0, 31], 100, 8, 8, 80, 32, id="mha-d80-bs32"),
    pytest.param([33, 200, 1], [300, 17, 0], 5, 12, 4, 64, 16, id="gqa3"),
]
CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize(
    "query_lens, context_lens, padded_tokens, num_heads, num_kv_heads, head_dim, block_size", CUDA_CASES
)
def test_compiled_kernel_matches_reference(
    query_lens, context_lens, padded_tokens, num_heads, num_kv_heads, head_dim, block_size, dtype
):
    batch = make_prefill_batch(
        query_lens, context_lens, padded_tokens=padded_tokens, num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, block_size=block_size, dtype=dtype, device="cuda", poison_unowned_slots=True,
    )
    out = run_triton(batch)
    assert torch.isfinite(out).all()
    padded = padded_rows(batch)
    assert torch.equal(out[padded], torch.zeros_like(out[padded]))
    expected = prefill_attention_reference(**batch)
    torch.testing.assert_close(out.float(), expected.float(), **tolerance(dtype, "cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
def test_masked_matches_reference_on_cuda(dtype):
    batch = make_prefill_batch(
        [70, 0, 1, 33], [100, 5, 300, 0], padded_tokens=9, num_heads=8, num_kv_heads=2, head_dim=80, block_size=16,
        dtype=dtype, device="cuda", poison_unowned_slots=True,
    )
    out = prefill_attention_masked(**batch)
    assert torch.isfinite(out).all()
    expected = prefill_attention_reference(**batch)
    torch.testing.assert_close(out.float(), expected.float(), **tolerance(dtype, "cuda"))


def _run_masked_into(out: torch.Tensor, **batch) -> None:
    out.copy_(prefill_attention_masked(**batch))


@pytest.mark.cuda
@pytest.mark.parametrize(
    "attention", [triton_prefill.paged_prefill_attention, _run_masked_into], ids=["triton", "masked"]
)
def test_captured_in_a_cuda_graph_follows_new_splits_lengths_and_tables(attention):
    """Nothing about the captured batch is baked in: a new split of the same T tokens over the same R request
    slots, new lengths and new tables, copied into the captured buffers, are all honoured on replay."""
    shape = dict(num_heads=8, num_kv_heads=2, head_dim=64, block_size=16, device="cuda", max_blocks=24, num_blocks=80)
    captured = make_prefill_batch([100, 0, 30, 2], [0, 7, 200, 40], padded_tokens=12, **shape, seed=1)
    replayed = make_prefill_batch([0, 1, 60, 70], [0, 300, 10, 0], padded_tokens=13, **shape, seed=2)
    assert captured["q"].shape == replayed["q"].shape
    static = {name: value.clone() if isinstance(value, torch.Tensor) else value for name, value in captured.items()}
    out = torch.empty_like(static["q"])
    attention(**static, out=out)  # compile (and warm up) outside the capture
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attention(**static, out=out)

    for batch in (replayed, captured):
        for name, value in batch.items():
            if isinstance(value, torch.Tensor):
                static[name].copy_(value)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, prefill_attention_reference(**batch), **tolerance(torch.float32, "cuda"))
