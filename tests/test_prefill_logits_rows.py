"""A prefill step computes logits only at the rows that need them (``logits_rows``: each request's last token),
in every mode, with the reference model and the transformers integration, and its graph pool shrinks with it."""

from __future__ import annotations

import pytest
import torch

from graphhal.paged_attention import PREFILL_ROW_OUTPUTS, PagedKVCache
from graphhal.refmodel import LlamaDecoder, ModelConfig, PrefillWorkload
from runners import PrefillConfig, PrefillRunner
from support.dispatch_mode_flags import restored_dispatch_mode_flags  # noqa: F401 (a fixture)

pytestmark = pytest.mark.cpu
MODES = ["disabled", "full", "breakable", "piecewise", "auto"]


def refmodel_setup(config: ModelConfig, num_blocks: int = 64):
    model = LlamaDecoder(config, "cpu", torch.float32)
    kv_cache = PagedKVCache(config, num_blocks=num_blocks, device="cpu", dtype=torch.float32)
    return model, kv_cache


@pytest.mark.parametrize("mode", MODES)
def test_the_reference_model_returns_each_requests_last_token_logits_in_every_mode(mode, restored_dispatch_mode_flags):
    torch._dynamo.reset()
    model, kv_cache = refmodel_setup(ModelConfig.tiny())
    workload = PrefillWorkload(kv_cache, [5, 3, 7], context_lens=[2, 0, 4])
    runner = PrefillRunner(
        model.prefill_forward(kv_cache, logits_rows=True), workload.token_slots(), workload.request_slots(logits_rows=True),
        "cpu", PrefillConfig(mode=mode, max_tokens=32, max_requests=4, show_progress=False),
        request_outputs=PREFILL_ROW_OUTPUTS,
    )
    with torch.inference_mode():
        runner.capture()
        every_token = model.prefill_forward(kv_cache)(**workload.batch())
        rows = runner.run(workload.batch(logits_rows=True))["logits"]
    assert rows.shape == (3, ModelConfig.tiny().vocab_size)
    torch.testing.assert_close(rows, every_token[torch.tensor([4, 7, 14])], rtol=1e-4, atol=1e-4)


def test_all_tokens_when_asked_is_the_plain_step():
    model, kv_cache = refmodel_setup(ModelConfig.tiny())
    workload = PrefillWorkload(kv_cache, [4, 4])
    with torch.inference_mode():
        all_rows = model.prefill_forward(kv_cache)(**workload.batch())
        chosen = model.prefill_forward(kv_cache, logits_rows=True)(**{**workload.batch(), "logits_rows": torch.arange(8)})
    assert all_rows.shape[0] == 8
    torch.testing.assert_close(chosen["logits"], all_rows)


def pool_of(model, kv_cache, workload, tokens: int, *, rows: bool) -> int:
    runner = PrefillRunner(
        model.prefill_forward(kv_cache, logits_rows=rows), workload.token_slots(), workload.request_slots(logits_rows=rows),
        "cpu", PrefillConfig(mode="full", buckets=[tokens], max_requests=4, show_progress=False),
        request_outputs=PREFILL_ROW_OUTPUTS if rows else (),
    )
    with torch.inference_mode():
        report = runner.capture()
    runner.close()
    return report.pool_bytes


def test_last_token_logits_shrink_the_prefill_pool_more_than_tenfold():
    """512 tokens and a 32k vocabulary here (the 2048 x 128k figure: ``graphhal.bench.logits_rows_pool``):
    the logits are the step's largest tensor, so one row per request takes the pool down with them."""
    config = ModelConfig(
        vocab_size=32000, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=128, block_size=16, max_seq_len=1024,
    )
    model, kv_cache = refmodel_setup(config, num_blocks=80)
    workload = PrefillWorkload(kv_cache, [128] * 4)
    every = pool_of(model, kv_cache, workload, 512, rows=False)
    last = pool_of(model, kv_cache, workload, 512, rows=True)
    assert every >= 10 * last, (every, last)


@pytest.mark.parametrize("mode", ["disabled", "full", "breakable", "piecewise"])
def test_the_transformers_prefill_runner_returns_rows_and_the_loop_samples_from_them(mode, restored_dispatch_mode_flags):
    pytest.importorskip("transformers")
    from graphhal.transformers import paged_kv_cache, prefill_runner
    from graphhal.transformers.steps import PrefillStep
    from support.transformers_models import build_model, skip_where_torch_cannot_compile_the_model

    skip_where_torch_cannot_compile_the_model(mode, None)
    torch._dynamo.reset()
    model = build_model("llama")
    kv_cache = paged_kv_cache(model, 32)
    config = PrefillConfig(mode=mode, max_tokens=16, max_requests=2, show_progress=False)
    runner = prefill_runner(model, kv_cache, "cpu", config, sampling=False, logits="rows")
    blocks = kv_cache.allocator.allocate(2)
    batch = {
        "input_ids": torch.tensor([5, 6, 7, 8, 9]), "positions": torch.tensor([0, 1, 2, 0, 1]),
        "slot_mapping": torch.tensor([blocks[0] * 16 + i for i in range(3)] + [blocks[1] * 16 + i for i in range(2)]),
        "query_lens": torch.tensor([3, 2], dtype=torch.int32), "seq_lens": torch.tensor([3, 2], dtype=torch.int32),
        "block_tables": torch.tensor([[blocks[0]] + [0] * 15, [blocks[1]] + [0] * 15], dtype=torch.int32),
    }
    with torch.inference_mode():
        runner.capture()
        rows = runner.run({**batch, "logits_rows": torch.tensor([2, 4])})["logits"]
        every = PrefillStep(model, kv_cache)(**batch)
    assert rows.shape == (2, 512)
    torch.testing.assert_close(rows, every[torch.tensor([2, 4])], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="logits must be 'rows' or 'all', got 'last'"):
        prefill_runner(model, kv_cache, "cpu", config, logits="last")
