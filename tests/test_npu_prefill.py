"""Prefill on the npu device through the generic graph strategies, on the CPU SIMULATOR of torch_npu.

PrefillRunner's piecewise (torch.compile split at attention, every other piece captured as an NPU graph)
and breakable modes run on npu with no npu-specific code: graph output equals eager for packed batches of
random requests across bucket boundaries.
"""

from __future__ import annotations


import pytest
import torch

prefill_runner = pytest.importorskip("runners.prefill_runner", reason="PrefillRunner has not landed yet")
prefill_workload = pytest.importorskip("refmodel.prefill_workload", reason="the prefill path has not landed yet")

from refmodel import LlamaDecoder, ModelConfig, PagedKVCache  # noqa: E402
from runners.config import PrefillConfig  # noqa: E402
from support.npu_simulator.fixture import npu_profile, npu_simulator, simulated_npu  # noqa: E402, F401 (fixtures)

pytestmark = pytest.mark.cpu

BUCKETS = [8, 16, 32]
MAX_REQUESTS = 4
# (query lens, context lens) of packed batches whose totals hit and straddle the buckets
PACKINGS = [([7], [0]), ([5, 3], [2, 9]), ([4, 4, 1], [0, 3, 11]), ([16], [5]), ([10, 7], [1, 0]), ([9, 9, 9, 4], [2, 0, 7, 1])]


@pytest.mark.parametrize("mode", ["piecewise", "breakable"])
def test_prefill_on_npu_equals_eager(simulated_npu, mode):
    torch._dynamo.reset()  # piecewise compiles the forward once; start from a clean cache
    config = ModelConfig.tiny()
    device = simulated_npu.torch_device
    model = LlamaDecoder(config, device, torch.float32, seed=0)
    kv_cache = PagedKVCache(config, 160, device, torch.float32)
    conventions = simulated_npu.conventions
    probe = prefill_workload.PrefillWorkload(kv_cache, [1], conventions=conventions)
    token_slots, request_slots = probe.token_slots(), probe.request_slots()
    probe.release()
    runner = prefill_runner.PrefillRunner(
        model.prefill_forward(kv_cache),
        token_slots,
        request_slots,
        simulated_npu,
        PrefillConfig(mode=mode, buckets=BUCKETS, max_requests=MAX_REQUESTS, show_progress=False),
    )
    runner.capture()
    for seed, (query_lens, context_lens) in enumerate(PACKINGS):
        workload = prefill_workload.PrefillWorkload(
            kv_cache, query_lens, context_lens=context_lens, seed=seed, conventions=conventions
        )
        try:
            batch = workload.batch()
            assert batch["slot_mapping"].dtype == torch.int32  # the npu convention reached the batch
            with torch.no_grad():
                eager = runner.forward(**batch).clone()
            graph = runner.run(batch).clone()
            assert graph.shape == eager.shape == (sum(query_lens), config.vocab_size)
            torch.testing.assert_close(graph, eager, rtol=1e-4, atol=1e-4)
        finally:
            workload.release()
