"""A captured matmul's cuBLAS workspace belongs to its graph, whatever clears torch's workspace cache after.

torch.compile's cudagraph trees clear every cached cuBLAS workspace around their own captures
(``clear_cublas_manager``). A graphhal graph that had captured a workspace made outside its capture then
replayed into memory the allocator had handed back: ``graphhal bench`` hit an illegal memory access on an
H100 (torch 2.11) once its reduce-overhead contender had compiled. Each capture now takes its workspace into
its own pool.
"""

from __future__ import annotations

import pytest
import torch

from graphhal.paged_attention import PagedKVCache, decode_input_slots
from graphhal.refmodel import DecodeWorkload, LlamaDecoder, ModelConfig
from runners import DecodeConfig, DecodeRunner

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("mode", ["full", "breakable", "piecewise"])
def test_a_graph_replays_right_after_a_reduce_overhead_compile_cleared_the_blas_workspaces(mode):
    config = ModelConfig.tiny()
    model = LlamaDecoder(config, "cuda", torch.bfloat16, seed=0)
    kv_cache = PagedKVCache(config, num_blocks=64, device="cuda", dtype=torch.bfloat16)
    runner = DecodeRunner(
        model.decode_forward(kv_cache), decode_input_slots(config), "cuda:0",
        DecodeConfig(mode=mode, buckets=[4, 8], show_progress=False),
    )
    with torch.inference_mode():
        runner.capture()
        workload = DecodeWorkload(kv_cache, 8, max_context_len=12, seed=1)
        batch = workload.batch(8)
        expected = model.decode_forward(kv_cache)(**batch).clone()

        # What a reduce-overhead compile does around its own captures, then memory that takes the freed
        # blocks and holds a pattern a stray workspace write would break.
        weight = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
        compiled = torch.compile(lambda x: torch.relu(x @ weight), mode="reduce-overhead")
        for _ in range(3):
            compiled(torch.randn(32, 256, device="cuda", dtype=torch.bfloat16))
        torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()
        fillers = [torch.full((8 << 20,), 7, dtype=torch.int32, device="cuda") for _ in range(8)]

        for _ in range(3):
            got = runner.run(batch).clone()
            torch.cuda.synchronize()
            torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
        assert all(bool((filler == 7).all()) for filler in fillers)
    runner.close()
    torch._dynamo.reset()
