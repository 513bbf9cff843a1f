"""Which route the reference model's npu attention takes on each torch_npu line, on the CPU SIMULATOR.

Each line's op-plugin documents different limits for ``npu_fused_infer_attention_score`` over a paged cache
(``graphhal.paged_attention.npu_fused_attention_limits``), and the simulator applies each line's own
(``support.npu_simulator``): layout TND with page attention from 7.3 only, with a head dim of 128 or 192; the
incremental branch (BSH) on every line for blocks of 16n tokens (at most 512 from 7.2). So decode runs in TND
(vllm-ascend's route) from 7.3 and in BSH before; a model whose shapes no layout takes runs the graph-safe
torch kernel, says why, and still captures. Lengths are read on the host once per step, not once per layer.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import replace

import pytest
import torch

import hal
from devices.npu.host_length_ops import HostLengthUpdateError
from graphhal.paged_attention import PagedKVCache, npu_fused_attention_limits
from graphhal.refmodel import DecodeWorkload, LlamaDecoder, ModelConfig
from graphhal.refmodel.prefill_workload import PrefillWorkload
from runners import DecodeConfig, DecodeRunner
from support.npu_simulator import SimulatorState, TorchNpuProfile
from support.npu_simulator.fixture import npu_profile, npu_simulator, simulated_npu  # noqa: F401 (fixtures)

pytestmark = pytest.mark.cpu

DTYPE = torch.bfloat16
FUSED_CONFIG = replace(ModelConfig.tiny(), num_layers=3, head_dim=128, block_size=16)  # what TND takes from 7.3
TINY_BLOCKS = replace(ModelConfig.tiny(), num_layers=3)  # blocks of 4 tokens: no layout of the fused op takes them
MAX_BS = 4
TOLERANCE = {"rtol": 2e-2, "atol": 2e-2}


class Decoder:
    def __init__(self, device: hal.Device, config: ModelConfig, mode: str = "full") -> None:
        self.kv_cache = PagedKVCache(config, 1 + MAX_BS * config.max_blocks_per_seq, device.torch_device, DTYPE)
        self.step = LlamaDecoder(config, device.torch_device, DTYPE, seed=0).decode_forward(self.kv_cache)
        self.workload = DecodeWorkload(self.kv_cache, MAX_BS, max_context_len=40, seed=1, conventions=device.conventions)
        config = DecodeConfig(mode=mode, buckets=[2, MAX_BS], show_progress=False)
        self.runner = DecodeRunner(self.step, self.workload.input_slots(), device, config)


def test_decode_runs_in_tnd_from_7_3_and_in_bsh_before(simulated_npu, npu_simulator: SimulatorState):
    decoder = Decoder(simulated_npu, FUSED_CONFIG)
    decoder.runner.capture()
    for rows in (1, 3, MAX_BS):
        batch = decoder.workload.batch(rows)
        with torch.no_grad():
            eager = decoder.step(**batch).clone()
        torch.testing.assert_close(decoder.runner.run(batch), eager, **TOLERANCE)
        replayed = [launch for launch in npu_simulator.launches if launch.phase == "replay"][-FUSED_CONFIG.num_layers:]
        bucket = 2 if rows <= 2 else MAX_BS
        expected_lengths = (*batch["seq_lens"].tolist(), *[0] * (bucket - rows))
        for launch in replayed:
            assert launch.lengths == expected_lengths
            if npu_simulator.profile.fia_tnd_page_attention:  # TND: one token per request, as cumulative ends
                assert launch.query_ends == tuple(range(1, bucket + 1))
            else:
                assert launch.query_ends is None  # BSH


def test_a_model_no_fused_layout_takes_runs_the_torch_kernel_says_why_and_still_captures(
    simulated_npu, npu_simulator: SimulatorState, caplog
):
    caplog.set_level(logging.WARNING, logger=npu_fused_attention_limits.__name__)
    npu_fused_attention_limits._fallbacks.clear()
    decoder = Decoder(simulated_npu, TINY_BLOCKS)
    decoder.runner.capture()
    batch = decoder.workload.batch(3)
    with torch.no_grad():
        eager = decoder.step(**batch).clone()
    torch.testing.assert_close(decoder.runner.run(batch), eager, **TOLERANCE)
    assert npu_simulator.launches == []  # no fused launch: the torch kernel ran, eagerly and in the graph
    (reason,) = npu_fused_attention_limits.fallbacks_taken()
    assert "block_size 16-aligned" in reason and "not 4" in reason and "graph-safe torch kernel" in reason
    assert sum("graph-safe torch kernel" in record.message for record in caplog.records) == 1  # said once


def test_prefill_before_7_3_runs_the_torch_kernel_naming_the_line_and_what_to_install(simulated_npu, npu_profile):
    npu_fused_attention_limits._fallbacks.clear()
    kv_cache = PagedKVCache(FUSED_CONFIG, 32, simulated_npu.torch_device, DTYPE)
    step = LlamaDecoder(FUSED_CONFIG, simulated_npu.torch_device, DTYPE).prefill_forward(kv_cache)
    workload = PrefillWorkload(kv_cache, [5, 3], context_lens=[2, 9], conventions=simulated_npu.conventions)
    try:
        with torch.no_grad():
            step(**workload.batch())
    finally:
        workload.release()
    taken = npu_fused_attention_limits.fallbacks_taken()
    if npu_profile.fia_tnd_page_attention:
        assert taken == []
    else:
        (reason,) = taken
        line = npu_profile.name.partition("-")[0]  # 7.2's PyTorch 2.6 cut is line 7.2 to op-plugin
        assert f"torch_npu {line} (op-plugin {npu_profile.op_plugin})" in reason
        assert "no page attention in layout TND" in reason and "torch_npu 7.3 or later" in reason


def test_the_plugin_refuses_tnd_over_pages_in_a_graph_where_the_line_does_not_document_it(simulated_npu, npu_profile):
    """Model code other than refmodel's calls the op as it likes: the device's capture refuses what the build's
    op-plugin does not document in a graph, before the launch, naming the line and what to do."""
    torch_npu = sys.modules["torch_npu"]
    heads, head_dim, block_size = 2, 128, 16
    cache = torch.zeros(4, block_size, heads * head_dim, dtype=DTYPE)
    graph = simulated_npu.make_graph("full")
    call = dict(
        actual_seq_lengths=[3, 4], actual_seq_lengths_kv=[3, 1], block_table=torch.tensor([[1], [0]], dtype=torch.int32),
        num_heads=heads, num_key_value_heads=heads, input_layout="TND", block_size=block_size,
    )
    query = torch.zeros(4, heads, head_dim, dtype=DTYPE)
    if npu_profile.fia_tnd_page_attention:
        with simulated_npu.capture_session(graph, simulated_npu.graph_pool()):
            torch_npu.npu_fused_infer_attention_score(query, cache, cache, **call)
        return
    with pytest.raises(HostLengthUpdateError, match="documents neither page attention in TND nor TND in graph mode"):
        with simulated_npu.capture_session(graph, simulated_npu.graph_pool()):
            torch_npu.npu_fused_infer_attention_score(query, cache, cache, **call)


@pytest.mark.parametrize("block_size", [4, 1024])
def test_the_simulator_takes_paged_decode_blocks_as_each_line_documents(simulated_npu, npu_profile: TorchNpuProfile, block_size):
    """16-aligned on every line; at most 512 from op-plugin 691bf15a (7.2); 480bc431 (7.1) names no maximum."""
    torch_npu = sys.modules["torch_npu"]
    heads, head_dim = 2, 16
    cache = torch.zeros(2, block_size, heads * head_dim, dtype=DTYPE)
    call = lambda: torch_npu.npu_fused_infer_attention_score(  # noqa: E731
        torch.zeros(1, 1, heads * head_dim, dtype=DTYPE), cache, cache, block_table=torch.tensor([[1]], dtype=torch.int32),
        actual_seq_lengths_kv=[3], num_heads=heads, num_key_value_heads=heads, input_layout="BSH", block_size=block_size,
    )
    if block_size == 1024 and npu_profile.fia_paged_max_block_size is None:
        call()
        return
    with pytest.raises(ValueError, match=rf"torch_npu {npu_profile.name} .*block_size 16-aligned.*got {block_size}"):
        call()


def test_the_simulator_refuses_decode_lengths_needing_more_blocks_than_the_cache_has(simulated_npu):
    torch_npu = sys.modules["torch_npu"]
    cache = torch.zeros(3, 16, 32, dtype=DTYPE)  # 3 blocks
    with pytest.raises(ValueError, match="need 4 blocks together but the cache has 3"):
        torch_npu.npu_fused_infer_attention_score(
            torch.zeros(2, 1, 32, dtype=DTYPE), cache, cache, block_table=torch.tensor([[1, 2], [1, 2]], dtype=torch.int32),
            actual_seq_lengths_kv=[32, 20], num_heads=2, num_key_value_heads=2, input_layout="BSH", block_size=16,
        )


@pytest.mark.parametrize("config", [FUSED_CONFIG, TINY_BLOCKS], ids=["fused", "torch-kernel"])
@pytest.mark.parametrize("mode", ["eager", "piecewise", "breakable"])
def test_eager_attention_reads_the_lengths_on_the_host_once_per_step_not_once_per_layer(simulated_npu, monkeypatch, config, mode):
    """vllm-ascend builds the host lengths once per step; reading them per layer syncs the device per layer."""
    torch._dynamo.reset()
    decoder = Decoder(simulated_npu, config, mode="disabled" if mode == "eager" else mode)
    decoder.runner.capture()
    batch = decoder.workload.batch(3)
    seq_lens_reads = []
    tolist = torch.Tensor.tolist

    def counted(tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        if tensor.dtype == torch.int32 and tensor.dim() == 1:
            seq_lens_reads.append(tuple(tensor.shape))
        return tolist(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    decoder.runner.run(batch)
    # One read of the step's lengths, and none per layer (graph modes also read the batch's for the update).
    assert len(seq_lens_reads) <= 2, seq_lens_reads
