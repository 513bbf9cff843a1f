"""The Triton sampler draws what the torch math defines: the same tokens from the same logits and parameters.

On CPU the kernels run under Triton's interpreter (conftest.py sets TRITON_INTERPRET=1 when CUDA is absent,
before this module imports them), where they compute in IEEE float32 like torch: tokens are bit-identical.
Shapes stay small there (the interpreter runs each program in Python) and the chunk size small, so that a
row spans several programs of the vocabulary pass. On CUDA the kernels run compiled, at a real vocabulary,
and inside a captured CUDA graph whose parameters change between replays.
"""

from __future__ import annotations

import pytest
import torch

import graphhal.sampling.triton_sample as triton_sample
from graphhal.sampling.triton_random import uniforms_triton
from graphhal.sampling import sample, sample_reference, uniforms

needs_interpreter = pytest.mark.skipif(
    torch.cuda.is_available() and not triton_sample.runs_in_interpreter(),
    reason="the kernels were compiled for a GPU; CPU tensors need TRITON_INTERPRET=1 set before they are imported",
)


def mixed_batch(rows: int, vocab: int, *, seed: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> dict:
    """Logits and a mix of every kind of row: greedy, plain temperature, each filter alone, filters together,
    extreme temperatures, negative and huge seeds and counters."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator) * torch.linspace(0.5, 5.0, rows)[:, None]
    if rows > 3:
        logits[3, :7] = logits[3].max() + 1  # ties for the maximum (greedy or not)

    def choice(values: list) -> torch.Tensor:
        return torch.tensor(values)[torch.randint(0, len(values), (rows,), generator=generator)]

    parameters = dict(
        temperature=choice([0.0, 0.0, 1.0, 0.7, 1.5, 3.0, 1e-5, 100.0]).float(),
        top_k=choice([0, 0, 0, 1, 5, 40, 10_000]).int(),
        top_p=choice([1.0, 1.0, 0.9, 0.5, 0.05]).float(),
        min_p=choice([0.0, 0.0, 0.1, 0.5, 1.0]).float(),
        seed=torch.randint(-(2**62), 2**62, (rows,), generator=generator),
        counter=torch.randint(0, 2**40, (rows,), generator=generator),
    )
    # At least one greedy and one sampled row; a batch of one row samples (greedy alone would test little).
    parameters["temperature"][:2] = torch.tensor([0.0, 1.0] if rows > 1 else [1.0])
    return dict(logits=logits.to(device=device, dtype=dtype), **{k: v.to(device) for k, v in parameters.items()})


def assert_same_draws(batch: dict, max_top_k: int, chunk_size: int = triton_sample.DEFAULT_CHUNK_SIZE) -> None:
    expected_tokens, expected_logprobs = sample_reference(**batch, max_top_k=max_top_k)
    tokens, logprobs = triton_sample.sample_triton(**batch, max_top_k=max_top_k, chunk_size=chunk_size)
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logprobs, expected_logprobs, rtol=1e-5, atol=1e-5)


# (rows, vocab, max_top_k, chunk_size): several chunks per row with a partial last one; K larger than the
# vocabulary; one chunk per row; K not a power of two.
INTERPRETER_CASES = [(12, 1000, 64, 256), (6, 50, 256, 16), (8, 300, 300, 512), (5, 777, 24, 128)]


@pytest.mark.cpu
@needs_interpreter
@pytest.mark.parametrize("rows, vocab, max_top_k, chunk_size", INTERPRETER_CASES)
def test_interpreted_kernels_draw_the_reference_tokens(rows, vocab, max_top_k, chunk_size):
    assert_same_draws(mixed_batch(rows, vocab, seed=rows + vocab), max_top_k, chunk_size)


def binding_batch(rows: int, vocab: int, *, seed: int, device: str = "cpu") -> dict:
    """Rows where each filter, alone or with others, decides the token: a hot temperature spreads the draw far
    beyond what the filter keeps, so a kernel that skipped or misapplied a filter would draw another token."""
    generator = torch.Generator().manual_seed(seed)
    filters = [  # (top_k, top_p, min_p)
        (3, 1.0, 0.0), (0, 0.3, 0.0), (0, 1.0, 0.5), (10, 0.5, 0.0), (20, 1.0, 0.3), (0, 0.6, 0.4), (6, 0.4, 0.2),
    ]
    chosen = [filters[row % len(filters)] for row in range(rows)]
    batch = dict(
        logits=torch.randn(rows, vocab, generator=generator) * 3,
        temperature=torch.full((rows,), 5.0),
        top_k=torch.tensor([f[0] for f in chosen], dtype=torch.int32),
        top_p=torch.tensor([f[1] for f in chosen]),
        min_p=torch.tensor([f[2] for f in chosen]),
        seed=torch.arange(rows) * 1_000_003,
        counter=torch.arange(rows) + 11,
    )
    return {name: value.to(device) for name, value in batch.items()}


@pytest.mark.cpu
@needs_interpreter
def test_interpreted_kernels_apply_every_filter_where_it_decides_the_token():
    batch = binding_batch(28, 300, seed=4)
    unfiltered = {**batch, "top_k": torch.zeros_like(batch["top_k"]), "top_p": torch.ones(28), "min_p": torch.zeros(28)}
    differs = sample_reference(**batch, max_top_k=32)[0] != sample_reference(**unfiltered, max_top_k=32)[0]
    assert differs.float().mean() > 0.7, "the filters must decide most rows' tokens, or this test proves little"
    assert_same_draws(batch, max_top_k=32, chunk_size=128)


@pytest.mark.cpu
@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_interpreted_kernels_read_half_precision_logits(dtype):
    assert_same_draws(mixed_batch(6, 500, seed=3, dtype=dtype), max_top_k=32, chunk_size=128)


@pytest.mark.cpu
@needs_interpreter
def test_interpreted_kernels_hash_the_same_uniforms_as_torch():
    seed = torch.tensor([0, -1, 2**62 + 5, -(2**63)])
    counter = torch.tensor([0, 2**33 + 1, 7, 2**63 - 1])
    assert torch.equal(uniforms_triton(seed, counter, 2100), uniforms(seed, counter, torch.arange(2100)))


@pytest.mark.cpu
@needs_interpreter
def test_interpreted_kernels_on_strided_logits_and_an_empty_batch():
    batch = mixed_batch(4, 200, seed=5)
    wide = torch.zeros(4, 3, 200)
    wide[:, 1] = batch["logits"]
    assert_same_draws({**batch, "logits": wide[:, 1]}, max_top_k=16, chunk_size=64)  # rows 600 elements apart
    empty = {name: value[:0] for name, value in batch.items()}
    tokens, logprobs = triton_sample.sample_triton(**empty, max_top_k=16)
    assert tokens.shape == logprobs.shape == (0,)


# --- compiled, on a GPU ------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, vocab, max_top_k", [(64, 128_256, 256), (1, 32_000, 256), (13, 151_936, 64), (200, 5_000, 256)])
def test_compiled_kernels_draw_the_reference_tokens(rows, vocab, max_top_k, dtype):
    # Compiled, logs and divisions round differently from torch's (approximate division, another log): a token
    # differs only where two scores tie within a few ulps, which these fixed draws do not hit.
    assert_same_draws(mixed_batch(rows, vocab, seed=rows, dtype=dtype, device="cuda"), max_top_k)


@pytest.mark.cuda
def test_compiled_kernels_apply_every_filter_where_it_decides_the_token():
    assert_same_draws(binding_batch(64, 128_256, seed=4, device="cuda"), max_top_k=256)


@pytest.mark.cuda
def test_compiled_kernels_hash_the_same_uniforms_as_torch_on_cpu():
    seed = torch.tensor([0, -1, 2**62 + 5, -(2**63)])
    counter = torch.tensor([0, 2**33 + 1, 7, 2**63 - 1])
    on_gpu = uniforms_triton(seed.cuda(), counter.cuda(), 130_000).cpu()
    assert torch.equal(on_gpu, uniforms(seed, counter, torch.arange(130_000)))
    assert torch.equal(uniforms(seed.cuda(), counter.cuda(), torch.arange(130_000, device="cuda")).cpu(), on_gpu)


@pytest.mark.cuda
def test_sampling_replayed_from_a_cuda_graph_follows_new_parameters_and_never_syncs():
    """Nothing about the captured step's parameters is baked in, and neither the eager sampler nor a replay
    waits for the host (a sync raises under the sync debug mode)."""
    captured = mixed_batch(32, 128_256, seed=1, dtype=torch.bfloat16, device="cuda")
    static = {name: value.clone() for name, value in captured.items()}
    sample(**static)  # compile the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens, logprobs = sample(**static)

    for seed in (2, 3, 1):
        batch = mixed_batch(32, 128_256, seed=seed, dtype=torch.bfloat16, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for name, value in batch.items():
                static[name].copy_(value)
            graph.replay()
            expected_tokens, expected_logprobs = sample(**batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(tokens, expected_tokens)
        torch.testing.assert_close(logprobs, expected_logprobs, rtol=0, atol=0)
