"""Prefill on the npu device, on the CPU SIMULATOR of torch_npu (every simulated release line).

Prefill attention on npu runs torch_npu's fused infer-attention op in the packed "TND" layout
(``graphhal.paged_attention.npu_prefill_attention``), with host lengths: the cumulative query ends and the KV lengths. So a
full graph of the whole prefill step is right only if the npu device re-issues that launch with the live
lengths (``Device.update`` with ``seq_lens`` and ``query_lens``) before every replay. Graph output equals
eager output for packed batches of random splits with cached contexts, padding requests and padded tokens,
in every mode; the kernel itself equals the token-by-token reference; a replay without its update is refused.

Which kernel each mode runs here: ``full`` captures the npu kernel and ``breakable`` runs it eagerly at its
break; ``piecewise`` runs the custom op between compiled pieces, and on the simulator that is the op's CPU
kernel (its npu kernel is registered only where torch_npu names the PrivateUse1 backend "npu").

The simulator checks the op's arguments as each line's op-plugin documents them
(``support.npu_simulator.packed_prefill``): TND over a paged cache from 7.3 on, with a head dim of 128 and
blocks of 16n tokens, hence ``CONFIG``. On 7.1 and 7.2, which document no page attention in TND, the npu kernel
runs the graph-safe torch kernel instead (``npu_fused_attention_limits``): no fused launch, no update, and
graphs in every mode all the same.
"""

from __future__ import annotations

from dataclasses import replace
from itertools import accumulate

import pytest
import torch

import hal
from hal.graph_support import graph_support_of
from devices.npu.host_length_ops import HostLengthUpdateError
from devices.npu.npu_graph import MissingUpdateError
from graphhal.paged_attention import PagedKVCache
from graphhal.refmodel import LlamaDecoder, ModelConfig
from graphhal.paged_attention.npu_prefill_attention import prefill_attention_npu
from graphhal.paged_attention.prefill_attention_reference import prefill_attention_reference
from graphhal.refmodel.prefill_workload import PrefillWorkload
from runners.config import PrefillConfig
from runners.prefill_runner import PrefillRunner
from support.npu_simulator import SimulatedHangError, SimulatorState, TorchNpuProfile
from support.npu_simulator.fixture import npu_profile, npu_simulator, simulated_npu  # noqa: F401 (fixtures)

pytestmark = pytest.mark.cpu

BUCKETS = [8, 16, 32]
MAX_REQUESTS = 4
# (query lens, context lens) of packed batches whose totals hit and straddle the buckets: [5, 3] fills bucket
# 8 exactly beside two padding requests (the token tail gets no rows); [7] leaves 3 padding requests and a
# padded token; [4, 4, 1] leaves 7 padded tokens.
PACKINGS = [([7], [0]), ([5, 3], [2, 9]), ([4, 4, 1], [0, 3, 11]), ([16], [5]), ([10, 7], [1, 0]), ([9, 9, 9, 4], [2, 0, 7, 1])]
DTYPE = torch.bfloat16  # the fused attention op takes float16 or bfloat16
CONFIG = replace(ModelConfig.tiny(), head_dim=128, block_size=16)  # TND: head dim 128; paged: blocks of 16n
TOLERANCE = {"rtol": 2e-2, "atol": 2e-2}


class NpuPrefill:
    """The reference decoder in bfloat16 on ``device``, its cache and a prefill runner over it."""

    def __init__(self, device: hal.Device, mode: str) -> None:
        self.device = device
        torch_device = device.torch_device
        self.kv_cache = PagedKVCache(CONFIG, 160, torch_device, DTYPE)
        self.step = LlamaDecoder(CONFIG, torch_device, DTYPE, seed=0).prefill_forward(self.kv_cache)
        probe = PrefillWorkload(self.kv_cache, [1], conventions=device.conventions)
        token_slots, request_slots = probe.token_slots(), probe.request_slots()
        probe.release()
        config = PrefillConfig(mode=mode, buckets=BUCKETS, max_requests=MAX_REQUESTS, show_progress=False)
        self.runner = PrefillRunner(self.step, token_slots, request_slots, device, config)

    def workload(self, seed: int, query_lens: list[int], context_lens: list[int]) -> PrefillWorkload:
        return PrefillWorkload(
            self.kv_cache, query_lens, context_lens=context_lens, seed=seed, conventions=self.device.conventions
        )


def bucket_of(tokens: int) -> int:
    return next(bucket for bucket in BUCKETS if bucket >= tokens)


@pytest.mark.parametrize("mode", ["full", "piecewise", "breakable"])
def test_prefill_on_npu_equals_eager(simulated_npu, npu_simulator: SimulatorState, mode):
    torch._dynamo.reset()  # piecewise compiles the forward once; start from a clean cache
    prefill = NpuPrefill(simulated_npu, mode)
    prefill.runner.capture()
    assert prefill.runner.config.mode == mode
    for seed, (query_lens, context_lens) in enumerate(PACKINGS):
        workload = prefill.workload(seed, query_lens, context_lens)
        try:
            batch = workload.batch()
            assert batch["slot_mapping"].dtype == torch.int32  # the npu convention reached the batch
            with torch.no_grad():
                eager = prefill.step(**batch).clone()
            graph = prefill.runner.run(batch).clone()
            assert graph.shape == eager.shape == (sum(query_lens), CONFIG.vocab_size)
            torch.testing.assert_close(graph, eager, **TOLERANCE)
            if not npu_simulator.profile.fia_tnd_page_attention:  # the torch kernel: no fused launch at all
                assert not npu_simulator.launches
            elif mode == "full":  # the replayed attention ran with this batch's lengths, padded, and the token tail
                replayed = [launch for launch in npu_simulator.launches if launch.phase == "replay"][-1]
                padding = MAX_REQUESTS - len(query_lens)
                seq_lens = [query + context for query, context in zip(query_lens, context_lens)]
                live_tokens = sum(query_lens)
                assert replayed.query_ends == (*accumulate(query_lens), *[live_tokens] * padding, bucket_of(live_tokens))
                assert replayed.lengths == (*seq_lens, *[0] * padding, 1)
        finally:
            workload.release()


def test_the_npu_kernel_equals_the_reference_with_zeros_in_padded_rows(simulated_npu):
    """The fused op's packed call, as refmodel makes it (cumulative ends, token tail, sparse_mode 3), gives the
    reference's causal-from-context attention, on a padded batch like a graph's: 4 request rows, 2 of them
    padding, 12 token rows of which 9 are live."""
    generator = torch.Generator().manual_seed(3)
    num_blocks, heads, kv_heads = 12, 4, 2
    shape = (num_blocks, CONFIG.block_size, kv_heads, CONFIG.head_dim)
    key_cache = torch.randn(shape, generator=generator).to(DTYPE)
    value_cache = torch.randn(shape, generator=generator).to(DTYPE)
    q = torch.randn(12, heads, CONFIG.head_dim, generator=generator).to(DTYPE)
    block_tables = torch.tensor([[3, 7, 0], [5, 1, 9], [0, 0, 0], [0, 0, 0]], dtype=torch.int32)
    query_lens = torch.tensor([6, 3, 0, 0], dtype=torch.int32)
    seq_lens = torch.tensor([6, 35, 0, 0], dtype=torch.int32)  # the second request has 32 cached tokens
    out = torch.full_like(q, float("nan"))
    prefill_attention_npu(q, key_cache, value_cache, block_tables, query_lens, seq_lens, CONFIG.head_dim**-0.5, out)
    expected = prefill_attention_reference(
        q, key_cache, value_cache, block_tables, query_lens, seq_lens, CONFIG.head_dim**-0.5
    )
    torch.testing.assert_close(out, expected, **TOLERANCE)
    assert out[9:].eq(0).all()


def needs_fused_prefill(profile: TorchNpuProfile) -> None:
    if not profile.fia_tnd_page_attention:
        pytest.skip(f"torch_npu {profile.name} documents no page attention in TND: prefill runs the torch kernel")


def test_a_full_prefill_graph_replayed_without_its_update_fails_loudly(simulated_npu, npu_profile):
    needs_fused_prefill(npu_profile)
    prefill = NpuPrefill(simulated_npu, "full")
    device, workload = simulated_npu, prefill.workload(0, [5, 3], [2, 9])
    try:
        batch = workload.batch()
        static = {name: tensor.clone() for name, tensor in batch.items()}
        graph = device.make_graph("full")
        with torch.no_grad():
            prefill.step(**static)  # eager once: the causal mask is made outside the capture
            with device.capture_session(graph, device.graph_pool()):
                logits = prefill.step(**static)
            with pytest.raises(MissingUpdateError, match="without an update since its capture.*wait forever"):
                device.replay(graph)
            with pytest.raises(HostLengthUpdateError, match="must give 'query_lens'"):
                device.update(graph, {hal.SlotRole.SEQ_LENS: [7, 12]})
            with pytest.raises(HostLengthUpdateError, match="add up to 9 tokens.*captured for 8 packed tokens"):
                device.update(graph, {hal.SlotRole.SEQ_LENS: [7, 12], hal.SlotRole.QUERY_LENS: [6, 3]})
            device.update(graph, {hal.SlotRole.SEQ_LENS: [7, 12], hal.SlotRole.QUERY_LENS: [5, 3]})
            device.replay(graph)
            torch.testing.assert_close(logits, prefill.step(**batch), **TOLERANCE)
            with pytest.raises(MissingUpdateError, match="since its previous replay"):
                device.replay(graph)
            # Past the plugin's own check, the simulator sees what hardware would do: the gated task never runs.
            with pytest.raises(SimulatedHangError, match="would hang"):
                graph.raw.npu_graph.replay()
    finally:
        workload.release()


def test_mode_auto_captures_full_prefill_graphs_on_npu(simulated_npu):
    """What this shows: on the simulated npu, mode "auto" picks and captures "full", and it runs right. What it
    does not: that ``graph_support_of(op, "npu")`` decided it. The runner looks declarations up under its
    torch device's type, which on the simulator is "cpu" (its npu tensors live on the CPU), and the model's npu
    route calls the fused op without entering ``graphhal::prefill_attention`` (so that a capture sees the
    fused op), so the probe reaches no declared op at all; on hardware the route is the same. The npu
    declaration is checked on its own, for callers that do go through the op."""
    prefill = NpuPrefill(simulated_npu, "auto")
    prefill.runner.capture()
    assert prefill.runner.config.mode == "full"
    assert simulated_npu.torch_device.type == "cpu"
    assert "no op in the forward declares a limit" in prefill.runner.mode_reason
    op = torch.ops.graphhal.prefill_attention.default
    assert graph_support_of(op, "npu") is hal.GraphSupport.ANY_BATCH
    assert graph_support_of(op, "cpu") is hal.GraphSupport.ANY_BATCH
    workload = prefill.workload(1, [4, 4, 1], [0, 3, 11])
    try:
        batch = workload.batch()
        with torch.no_grad():
            eager = prefill.step(**batch).clone()
        torch.testing.assert_close(prefill.runner.run(batch), eager, **TOLERANCE)
    finally:
        workload.release()


def test_the_npu_prefill_kernel_refuses_float32_naming_the_dtypes_it_takes(simulated_npu):
    kv_cache = PagedKVCache(CONFIG, 8, simulated_npu.torch_device, torch.float32)
    step = LlamaDecoder(CONFIG, simulated_npu.torch_device, torch.float32).prefill_forward(kv_cache)
    workload = PrefillWorkload(kv_cache, [3], conventions=simulated_npu.conventions)
    try:
        with pytest.raises(TypeError, match="float16 or bfloat16; the query is torch.float32"):
            step(**workload.batch())
    finally:
        workload.release()
