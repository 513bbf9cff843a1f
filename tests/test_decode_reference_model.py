"""The reference decoder through DecodeRunner equals the same decoder run eagerly, on cpu and cuda."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hal
from graphhal.paged_attention import PagedKVCache
from graphhal.refmodel import DecodeWorkload, LlamaDecoder, ModelConfig
from runners import DecodeConfig, DecodeRunner

MAX_BS = 16
BUCKETS = (16, 12, 8, 4, 2, 1)


class CapturedDecoder:
    """A tiny decoder, its cache, MAX_BS live requests and a runner captured for all of them."""

    def __init__(self, device_name: str, dtype: torch.dtype) -> None:
        self.device = hal.get_device(device_name)
        config = ModelConfig.tiny()
        torch_device = self.device.torch_device
        self.kv_cache = PagedKVCache(config, num_blocks=1 + MAX_BS * config.max_blocks_per_seq, device=torch_device, dtype=dtype)
        self.step = LlamaDecoder(config, torch_device, dtype, seed=0).decode_forward(self.kv_cache)
        self.workload = DecodeWorkload(self.kv_cache, MAX_BS, max_context_len=config.max_seq_len - 1, seed=1)
        self.runner = DecodeRunner(
            self.step,
            self.workload.input_slots(),
            self.device,
            DecodeConfig(max_bs=MAX_BS, show_progress=False),
            watched_tensors={"key_cache_0": self.kv_cache.key_caches[0]},
        )
        self.report = self.runner.capture()

    def eager_and_graph(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.workload.batch(rows)
        with torch.no_grad():
            eager = self.step(**batch).clone()
        graph = self.runner.run(batch).clone()
        return eager, graph


@pytest.fixture(scope="module", params=[pytest.param("cpu", marks=pytest.mark.cpu), pytest.param("cuda", marks=pytest.mark.cuda)])
def float32_decoder(request: pytest.FixtureRequest) -> CapturedDecoder:
    if not hal.default_registry().is_available(request.param):
        pytest.skip(f"device {request.param!r} is not available here")
    return CapturedDecoder(request.param, torch.float32)


def test_capture_covers_every_bucket_largest_first(float32_decoder: CapturedDecoder):
    assert float32_decoder.report.buckets == BUCKETS


@pytest.mark.parametrize("rows", BUCKETS)
def test_every_bucket_equals_eager_in_float32(float32_decoder: CapturedDecoder, rows: int):
    eager, graph = float32_decoder.eager_and_graph(rows)
    assert graph.shape == eager.shape == (rows, ModelConfig.tiny().vocab_size)
    torch.testing.assert_close(graph, eager, rtol=1e-4, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(min_value=1, max_value=MAX_BS))
def test_random_live_batch_sizes_equal_eager_in_float32(float32_decoder: CapturedDecoder, rows: int):
    eager, graph = float32_decoder.eager_and_graph(rows)
    torch.testing.assert_close(graph, eager, rtol=1e-4, atol=1e-4)


def test_padded_rows_do_not_write_into_live_requests_cache(float32_decoder: CapturedDecoder):
    decoder = float32_decoder
    owned_by_others = [block for blocks in decoder.workload.blocks[3:] for block in blocks]
    before = decoder.kv_cache.key_caches[0][owned_by_others].clone()
    decoder.runner.run(decoder.workload.batch(3))  # bucket 4: one padded row
    torch.testing.assert_close(decoder.kv_cache.key_caches[0][owned_by_others], before, rtol=0, atol=0)


@pytest.mark.cuda
@settings(max_examples=15, deadline=None)
@given(rows=st.integers(min_value=1, max_value=MAX_BS))
def test_random_live_batch_sizes_equal_eager_in_bfloat16_on_cuda(rows: int):
    decoder = _bfloat16_decoder()
    eager, graph = decoder.eager_and_graph(rows)
    torch.testing.assert_close(graph.float(), eager.float(), rtol=2e-2, atol=2e-2)


_bf16: list[CapturedDecoder] = []


def _bfloat16_decoder() -> CapturedDecoder:
    """Built once (hypothesis forbids function-scoped fixtures with @given)."""
    if not _bf16:
        _bf16.append(CapturedDecoder("cuda", torch.bfloat16))
    return _bf16[0]
