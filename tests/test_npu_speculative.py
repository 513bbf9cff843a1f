"""Verify steps (q = 1 + k tokens per request) of the reference decoder on the npu device, through DecodeRunner,
on the CPU SIMULATOR of torch_npu (every simulated torch_npu line; never hardware-verified here).

The npu's decode attention takes each request's KV length as a host value the device updates before every
replay; with several query tokens those stay per request (the query tokens go in as FIA's BSH sequence, causal
with sparse_mode 3). So a verify graph is updated exactly as a one-token one: the lengths of the live requests,
padded with q for padded requests (the simulator refuses a KV length below the query's S in sparse_mode 3), and its output equals eager in modes full and breakable.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from graphhal.paged_attention import PagedKVCache
from graphhal.refmodel import DecodeWorkload, LlamaDecoder, ModelConfig
from runners import DecodeConfig, DecodeRunner
from support.npu_simulator.fixture import PROFILE_PARAMS, npu_simulated_on_cpu

import hal

MAX_BS = 4
BUCKETS = [1, 2, 4]
DTYPE = torch.bfloat16
CONFIG = replace(ModelConfig.tiny(), block_size=16)


@pytest.mark.cpu
@pytest.mark.parametrize("mode", ["full", "breakable"])
@pytest.mark.parametrize("profile", [param.values[0] for param in PROFILE_PARAMS], ids=[param.id for param in PROFILE_PARAMS])
def test_verify_step_on_the_simulated_npu_equals_eager(profile, mode):
    with npu_simulated_on_cpu(profile) as simulator:
        device = hal.DeviceRegistry(load_entry_points=False).get_device("npu")
        cache = PagedKVCache(CONFIG, 1 + MAX_BS * CONFIG.max_blocks_per_seq, device.torch_device, DTYPE)
        step = LlamaDecoder(CONFIG, device.torch_device, DTYPE).decode_forward(cache)
        workload = DecodeWorkload(cache, MAX_BS, max_context_len=40, conventions=device.conventions, query_tokens=3)
        config = DecodeConfig(mode=mode, buckets=BUCKETS, query_tokens=3, show_progress=False)
        runner = DecodeRunner(step, workload.input_slots(), device, config)
        runner.capture()
        for rows in (4, 3, 1, 2):
            batch = workload.batch(rows)
            with torch.no_grad():
                eager = step(**batch).clone()
            graph = runner.run(batch)
            assert graph.shape == (rows, 3, CONFIG.vocab_size)
            torch.testing.assert_close(graph, eager, rtol=2e-2, atol=2e-2)
            if mode == "full":  # the attention replayed with these requests' lengths, padded requests' q
                padding = next(bucket for bucket in BUCKETS if bucket >= rows) - rows
                replayed = [launch for launch in simulator.launches if launch.phase == "replay"][-1].lengths
                assert replayed == (*batch["seq_lens"].tolist(), *(3,) * padding)


@pytest.mark.cpu
def test_the_simulator_refuses_a_kv_length_below_the_query_tokens_in_sparse_mode_3():
    """No document covers page attention with S > 1 in BSH: the simulator takes only KV lengths that count the S
    query tokens (what padded rows now get too), and refuses one below S rather than guess what hardware does."""
    from graphhal.paged_attention.npu_decode_attention import causal_mask

    with npu_simulated_on_cpu(PROFILE_PARAMS[-1].values[0]):
        import torch_npu

        device = hal.DeviceRegistry(load_entry_points=False).get_device("npu").torch_device
        heads, head_dim, block_size = 2, 16, 16
        query = torch.randn(2, 3, heads * head_dim, dtype=DTYPE, device=device)
        cache = torch.randn(4, block_size, heads * head_dim, dtype=DTYPE, device=device)
        table = torch.tensor([[1], [2]], dtype=torch.int32, device=device)
        options = dict(
            block_table=table, num_heads=heads, num_key_value_heads=heads, scale=0.25, input_layout="BSH",
            block_size=block_size, atten_mask=causal_mask(device), sparse_mode=3,
        )
        out, _ = torch_npu.npu_fused_infer_attention_score(query, cache, cache, actual_seq_lengths_kv=[3, 7], **options)
        assert out.shape == query.shape and torch.isfinite(out.float()).all()
        with pytest.raises(ValueError, match=r"query S of 3 needs every KV length to count the S query tokens .*got \[3, 2\]"):
            torch_npu.npu_fused_infer_attention_score(query, cache, cache, actual_seq_lengths_kv=[3, 2], **options)


@pytest.mark.cpu
def test_a_verify_step_with_blocks_past_the_bsh_limit_runs_the_torch_kernel():
    """torch_npu 7.3 documents TND's paged cache up to 1,024-token blocks, BSH's only up to 512: a verify step
    (BSH with S = q) over larger blocks must fall back to the graph-safe torch kernel, saying why, rather than
    call the fused op outside what its line documents."""
    from graphhal.paged_attention.decode_attention_reference import decode_attention_reference
    from graphhal.paged_attention.npu_decode_attention import decode_attention_npu
    from graphhal.paged_attention.npu_fused_attention_limits import fallbacks_taken

    newest = [param.values[0] for param in PROFILE_PARAMS][-1]
    with npu_simulated_on_cpu(newest):
        device = hal.DeviceRegistry(load_entry_points=False).get_device("npu").torch_device
        heads, head_dim, block_size, queries = 4, 128, 1024, 3
        keys = torch.randn(3, block_size, heads, head_dim, dtype=DTYPE).to(device)
        values = torch.randn(3, block_size, heads, head_dim, dtype=DTYPE).to(device)
        q = torch.randn(2, queries, heads, head_dim, dtype=DTYPE).to(device)
        tables = torch.tensor([[1, 2], [2, 1]], dtype=torch.int32).to(device)
        lengths = torch.tensor([1500, 40], dtype=torch.int32).to(device)
        out = torch.empty_like(q)
        decode_attention_npu(q, keys, values, tables, lengths, head_dim**-0.5, out)
        expected = decode_attention_reference(q, keys, values, tables, lengths, head_dim**-0.5)
        torch.testing.assert_close(out.cpu(), expected.cpu(), rtol=2e-2, atol=2e-2)
        assert any("verify" in note and str(block_size) in note for note in fallbacks_taken())

