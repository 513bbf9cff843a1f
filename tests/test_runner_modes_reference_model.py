"""Every graph mode through the runners on the reference model: graph output equals eager.

Decode in mode piecewise, and prefill of random packed batches and of mixed batches (decodes beside a
prompt's chunk) in every prefill mode, across bucket boundaries, on every device with graphs (cpu here,
cuda on a GPU machine).
"""

from __future__ import annotations

import pytest
import torch

import hal
from graphhal.paged_attention import PagedKVCache
from graphhal.refmodel import LlamaDecoder, ModelConfig, PrefillWorkload
from runners import DecodeConfig, DecodeRunner, PrefillConfig, PrefillRunner

PREFILL_BUCKETS = [8, 16, 32]
MAX_REQUESTS = 4
DECODE_BUCKETS = [1, 2, 4, 8]


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}


class Model:
    def __init__(self, device_name: str, dtype: torch.dtype = torch.float32) -> None:
        torch._dynamo.reset()  # every runner here compiles the same forward code; start each from scratch
        self.device = hal.get_device(device_name)
        self.config = ModelConfig.tiny()
        self.dtype = dtype
        self.model = LlamaDecoder(self.config, self.device.torch_device, dtype, seed=0)
        self.kv_cache = PagedKVCache(self.config, 160, self.device.torch_device, dtype)

    def prefill_runner(self, mode: str, **config) -> PrefillRunner:
        step = self.model.prefill_forward(self.kv_cache)
        probe = PrefillWorkload(self.kv_cache, [1])
        token_slots, request_slots = probe.token_slots(), probe.request_slots()
        probe.release()
        config.setdefault("buckets", PREFILL_BUCKETS)
        config.setdefault("max_requests", MAX_REQUESTS)
        runner = PrefillRunner(
            step, token_slots, request_slots, self.device, PrefillConfig(mode=mode, show_progress=False, **config)
        )
        runner.capture()
        return runner


def random_packings(seed: int, count: int, max_tokens: int = 32) -> list[tuple[list[int], list[int]]]:
    """(query lens, context lens) of packed batches whose totals hit and straddle the bucket boundaries."""
    generator = torch.Generator().manual_seed(seed)
    totals = [7, 8, 9, 16, 17, 31, 32, 1]
    packings = []
    for i in range(count):
        total = totals[i % len(totals)] if i < len(totals) else int(torch.randint(1, max_tokens + 1, (1,), generator=generator))
        requests = int(torch.randint(1, min(MAX_REQUESTS, total) + 1, (1,), generator=generator))
        cuts = sorted(torch.randperm(total - 1, generator=generator)[: requests - 1].add(1).tolist())
        query_lens = [b - a for a, b in zip([0, *cuts], [*cuts, total])]
        context_lens = torch.randint(0, 12, (requests,), generator=generator).tolist()
        packings.append((query_lens, context_lens))
    return packings


def graph_equals_eager(model: Model, runner: PrefillRunner, query_lens: list[int], context_lens: list[int], seed: int) -> None:
    """The runner's logits for a packed batch equal eager prefill of each request alone: independent of the
    runner (mode disabled included) and of how the batch was packed."""
    workload = PrefillWorkload(model.kv_cache, query_lens, context_lens=context_lens, seed=seed)
    try:
        graph = runner.run(workload.batch()).clone()
        with torch.no_grad():
            alone = torch.cat([model.model.prefill(**workload.batch([i]), kv_cache=model.kv_cache) for i in range(len(query_lens))])
        assert graph.shape == alone.shape == (sum(query_lens), model.config.vocab_size)
        torch.testing.assert_close(graph, alone, **tolerances(model.dtype))
    finally:
        workload.release()


PREFILL_MODES = ["full", "piecewise", "breakable", "disabled"]


@pytest.mark.parametrize("mode", PREFILL_MODES)
def test_prefill_of_random_packed_batches_equals_eager(graph_device, mode):
    model = Model(graph_device)
    runner = model.prefill_runner(mode)
    for seed, (query_lens, context_lens) in enumerate(random_packings(seed=3, count=12)):
        graph_equals_eager(model, runner, query_lens, context_lens, seed)


@pytest.mark.parametrize("mode", PREFILL_MODES)
def test_mixed_batches_of_decodes_and_a_prompt_chunk_equal_eager(graph_device, mode):
    # As a chunked-prefill scheduler batches them: requests decoding one token each after long contexts,
    # beside one chunk of a long prompt whose earlier chunks are cached.
    model = Model(graph_device)
    runner = model.prefill_runner(mode, max_requests=6)
    for seed, (decodes, chunk, chunk_context) in enumerate([(3, 12, 20), (5, 9, 0), (1, 31, 30), (4, 4, 7)]):
        query_lens = [chunk] + [1] * decodes
        context_lens = [chunk_context] + [30 + 5 * i for i in range(decodes)]
        graph_equals_eager(model, runner, query_lens, context_lens, seed)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["full", "piecewise", "breakable"])
def test_prefill_in_bfloat16_equals_eager_on_cuda(mode):
    model = Model("cuda", torch.bfloat16)
    runner = model.prefill_runner(mode)
    for seed, (query_lens, context_lens) in enumerate(random_packings(seed=5, count=8)):
        graph_equals_eager(model, runner, query_lens, context_lens, seed)


def test_piecewise_prefill_compiles_once_for_every_bucket(graph_device):
    model = Model(graph_device)
    runner = model.prefill_runner("piecewise")
    backend = runner._capture.strategy.backend
    assert backend.compile_count == 1
    # Prefill attention can be captured in any batch on cpu and cuda: it stays inside the one piece.
    assert backend.num_splits == 0 and len(backend.pieces) == 1
    assert all(sorted(piece.graphs) == PREFILL_BUCKETS for piece in backend.pieces)
    graph_equals_eager(model, runner, [5, 6], [3, 0], seed=1)
    assert backend.compile_count == 1


def test_breakable_prefill_breaks_at_every_attention(graph_device):
    model = Model(graph_device)
    runner = model.prefill_runner("breakable")
    assert all(bucket.graph.num_breaks == model.config.num_layers for bucket in runner.graphs.values())


def test_prefill_beyond_max_tokens_or_max_requests_runs_eagerly_or_raises(graph_device):
    model = Model(graph_device)
    runner = model.prefill_runner("piecewise", buckets=[8, 16])
    assert not runner.can_run(17) and runner.can_run(16)
    graph_equals_eager(model, runner, [10, 10], [0, 2], seed=2)  # 20 tokens: eager fallback
    graph_equals_eager(model, runner, [1, 1, 1, 1, 1], [0] * 5, seed=3)  # 5 requests > max_requests 4
    strict = model.prefill_runner("piecewise", buckets=[8], eager_fallback=False)
    workload = PrefillWorkload(model.kv_cache, [1] * 5)
    try:
        with pytest.raises(ValueError, match=r"5 rows of per-request inputs, more than the 4 the runner holds"):
            strict.run(workload.batch())
    finally:
        workload.release()


def test_mode_auto_captures_full_graphs_of_both_steps_where_attention_allows(graph_device):
    from graphhal.refmodel import DecodeWorkload

    model = Model(graph_device)
    prefill = model.prefill_runner("auto")
    assert prefill.config.mode == "full" and prefill.requested_mode == "auto"
    assert "graphhal::prefill_attention (any_batch)" in prefill.mode_reason
    graph_equals_eager(model, prefill, [5, 6], [3, 0], seed=1)

    workload = DecodeWorkload(model.kv_cache, 4, max_context_len=20, max_blocks_per_seq=8, seed=4)
    decode = DecodeRunner(
        model.model.decode_forward(model.kv_cache), workload.input_slots(), model.device,
        DecodeConfig(buckets=[1, 4], show_progress=False),
    )
    decode.capture()
    assert decode.config.mode == "full" and "graphhal::decode_attention (uniform_batch)" in decode.mode_reason


def test_piecewise_decode_equals_eager_with_one_compile(graph_device):
    from graphhal.refmodel import DecodeWorkload

    model = Model(graph_device)
    workload = DecodeWorkload(model.kv_cache, 8, max_context_len=20, max_blocks_per_seq=8, seed=4)
    step = model.model.decode_forward(model.kv_cache)
    runner = DecodeRunner(
        step, workload.input_slots(), model.device, DecodeConfig(mode="piecewise", buckets=DECODE_BUCKETS, show_progress=False)
    )
    runner.capture()
    for rows in (1, 2, 3, 5, 8, 7, 4, 1):
        batch = workload.batch(rows)
        with torch.no_grad():
            eager = step(**batch).clone()
        torch.testing.assert_close(runner.run(batch), eager, rtol=1e-4, atol=1e-4)
    assert runner._capture.strategy.backend.compile_count == 1


@pytest.mark.cuda
@pytest.mark.parametrize("mode, buckets", [("full", [1, 2, 4, 8]), ("full", [1]), ("breakable", [1, 4, 8]), ("piecewise", [2, 8])])
def test_decode_with_inductor_equals_eager_on_cuda(mode, buckets):
    from graphhal.refmodel import DecodeWorkload

    model = Model("cuda")
    workload = DecodeWorkload(model.kv_cache, 8, max_context_len=20, max_blocks_per_seq=8, seed=4)
    step = model.model.decode_forward(model.kv_cache)
    runner = DecodeRunner(
        step,
        workload.input_slots(),
        model.device,
        DecodeConfig(mode=mode, compiler="inductor", buckets=buckets, show_progress=False),
    )
    runner.capture()
    for rows in sorted({1, buckets[-1], max(1, buckets[-1] - 1)}):
        batch = workload.batch(rows)
        with torch.no_grad():
            eager = step(**batch).clone()
        torch.testing.assert_close(runner.run(batch), eager, rtol=1e-3, atol=1e-3)
    if mode == "breakable":
        assert all(bucket.graph.num_breaks == model.config.num_layers for bucket in runner.graphs.values())


@pytest.mark.cuda
def test_piecewise_prefill_with_inductor_pieces_equals_eager_on_cuda():
    model = Model("cuda")
    runner = model.prefill_runner("piecewise", compiler="inductor")
    for seed, (query_lens, context_lens) in enumerate(random_packings(seed=8, count=6)):
        graph_equals_eager(model, runner, query_lens, context_lens, seed)
    assert runner._capture.strategy.backend.compile_count == 1
