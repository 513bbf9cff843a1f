"""A failed npu capture leaves the process as it was, on every simulated torch_npu line.

hal's contract: a failed capture ends the capture and leaves the device usable. On npu that means, whichever
step fails (``capture_begin`` before or after the allocator starts routing into the pool, the captured body,
an op inside a task group, ``capture_end``): no dispatch mode left on the stack (torch_npu's or the plugin's,
or every later eager op is intercepted), no capture stream left current, no task group left open, the caching
allocator no longer routing into the pool (torch_npu up to 26.0 throws in ``capture_end`` before ending it,
and the next capture into that pool would then fail with "already recording to mempool_id"), and the same
pool capturing again, with replays equal to eager.
"""

from __future__ import annotations

import sys

import pytest
import torch

import hal
from runners import DecodeConfig, DecodeRunner, InputSlot
from support.npu_simulator import SimulatorState
from support.npu_simulator.fixture import npu_profile, npu_simulator, simulated_npu  # noqa: F401 (fixtures)

pytestmark = pytest.mark.cpu

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, MAX_BLOCKS, ROWS = 4, 2, 8, 16, 3, 2  # FIA pages: blocks of 16n
CAPACITY = MAX_BLOCKS * BLOCK_SIZE


class FusedAttentionStep:
    """One fused-attention decode step (``npu_fused_infer_attention_score``) over a small paged cache."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        shape = (1 + ROWS * MAX_BLOCKS, BLOCK_SIZE, KV_HEADS * HEAD_DIM)
        self.key_cache = torch.randn(shape, generator=generator).to(torch.bfloat16)
        self.value_cache = torch.randn(shape, generator=generator).to(torch.bfloat16)
        self.fail_with: Exception | None = None
        self.lengths_at_capture = CAPACITY

    def slots(self) -> list[InputSlot]:
        return [
            InputSlot("q", torch.bfloat16, (HEADS, HEAD_DIM)),
            InputSlot("block_tables", torch.int32, (MAX_BLOCKS,), fill=0),
            InputSlot("seq_lens", torch.int32, fill=0, role=hal.SlotRole.SEQ_LENS),
        ]

    def batch(self, lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        rows = len(lengths)
        return {
            "q": torch.randn(rows, HEADS, HEAD_DIM, generator=generator).to(torch.bfloat16),
            "block_tables": torch.arange(1, 1 + rows * MAX_BLOCKS, dtype=torch.int32).view(rows, MAX_BLOCKS),
            "seq_lens": torch.tensor(lengths, dtype=torch.int32),
        }

    def __call__(self, *, q: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        rows = q.shape[0]
        capturing = torch.npu.is_current_stream_capturing()
        lengths = [self.lengths_at_capture] * rows if capturing else seq_lens.tolist()
        out, _ = sys.modules["torch_npu"].npu_fused_infer_attention_score(
            (q * 1).reshape(rows, 1, -1), self.key_cache, self.value_cache, block_table=block_tables,
            actual_seq_lengths_kv=lengths, num_heads=HEADS, num_key_value_heads=KV_HEADS, scale=HEAD_DIM**-0.5,
            input_layout="BSH", block_size=BLOCK_SIZE,
        )
        if capturing and self.fail_with is not None:
            raise self.fail_with
        return out.view(rows, HEADS, HEAD_DIM)


def assert_left_clean(simulator: SimulatorState) -> None:
    assert simulator.modes_above_device() == []  # neither torch_npu's mode nor the plugin's
    assert simulator.capturing_graph is None and not torch.npu.is_current_stream_capturing()
    assert torch.npu.current_stream() is torch.npu.default_stream()  # the capture stream is not current
    assert simulator.pools_routed == {}  # the allocator routes nothing into the failed capture's pool


def assert_captures_again_into(device: hal.Device, pool, step: FusedAttentionStep) -> None:
    step.fail_with, step.lengths_at_capture = None, CAPACITY
    static = step.batch([CAPACITY, CAPACITY])
    graph = device.make_graph("full")
    with device.capture_session(graph, pool):
        captured = step(**static)
    for lengths in ([3, 0], [CAPACITY, 7]):
        static["seq_lens"].copy_(torch.tensor(lengths, dtype=torch.int32))
        device.update(graph, {hal.SlotRole.SEQ_LENS: lengths})
        device.replay(graph)
        torch.testing.assert_close(captured, step(**static), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("capture_begin_check", "TASK_QUEUE_ENABLE"),  # before the allocator routes into the pool
        ("capture_begin", "AclmdlRICaptureBegin failed"),  # after it does
        ("capture_end", "AclmdlRICaptureEnd failed"),  # torch_npu throws before ending the routing
    ],
)
def test_a_failing_capture_begin_or_end_leaves_nothing_behind(simulated_npu, npu_simulator, fault, message):
    step = FusedAttentionStep()
    pool = simulated_npu.graph_pool()
    graph = simulated_npu.make_graph("full")
    npu_simulator.faults.add(fault)
    with pytest.raises(RuntimeError, match=message):
        with simulated_npu.capture_session(graph, pool):
            step(**step.batch([1, 1]))
    assert not graph.raw.captured
    assert_left_clean(npu_simulator)
    assert_captures_again_into(simulated_npu, pool, step)


def _fail_in_the_body(step: "FusedAttentionStep") -> None:
    step.fail_with = RuntimeError("the model failed")


def _fail_inside_a_task_group(step: "FusedAttentionStep") -> None:
    step.lengths_at_capture = CAPACITY + 1  # the kernel refuses lengths past the block tables, inside the group


@pytest.mark.parametrize(
    ("fail", "error", "message"),
    [
        (_fail_in_the_body, RuntimeError, "the model failed"),
        (_fail_inside_a_task_group, ValueError, rf"length {CAPACITY + 1} outside 0\.\.{CAPACITY}"),
    ],
)
def test_a_failing_body_or_op_inside_its_task_group_leaves_nothing_behind(simulated_npu, npu_simulator, fail, error, message):
    step = FusedAttentionStep()
    pool = simulated_npu.graph_pool()
    fail(step)
    with pytest.raises(error, match=message):
        with simulated_npu.capture_session(simulated_npu.make_graph("full"), pool):
            step(**step.batch([1, 1]))
    assert_left_clean(npu_simulator)
    assert_captures_again_into(simulated_npu, pool, step)


def test_a_runner_whose_capture_fails_names_bucket_mode_and_device_and_captures_again(simulated_npu, npu_simulator):
    step = FusedAttentionStep()
    runner = DecodeRunner(step, step.slots(), simulated_npu, DecodeConfig(buckets=[1, 2], show_progress=False))
    npu_simulator.faults.add("capture_end")
    with pytest.raises(hal.CaptureError, match=r"bucket 2 \(mode full\) on npu") as failure:
        runner.capture()
    assert (failure.value.bucket, failure.value.mode, failure.value.device) == (2, "full", "npu")
    assert_left_clean(npu_simulator)
    runner.capture()
    for lengths in ([5, 0], [CAPACITY], [1, 2]):
        batch = step.batch(lengths, seed=len(lengths))
        torch.testing.assert_close(runner.run(batch), step(**batch), rtol=0, atol=0)


def test_npu_graphs_capture_hccl_collectives_and_refuse_a_group_of_another_backend(simulated_npu):
    import datetime
    import os

    import torch.distributed as dist

    assert simulated_npu.distributed_backend == "hccl"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=10))
    try:
        with pytest.raises(hal.UnsupportedModeError, match=r"captures collectives of backend 'hccl'.*backend is 'gloo'"):
            DecodeRunner(
                FusedAttentionStep(), FusedAttentionStep().slots(), simulated_npu,
                DecodeConfig(buckets=[1], show_progress=False), group=dist.group.WORLD,
            )
    finally:
        dist.destroy_process_group()


def test_a_failed_capture_end_under_an_hccl_group_says_what_to_change(simulated_npu, npu_simulator, monkeypatch):
    import torch.distributed as dist

    # The simulator has no HCCL: what the advice reads of torch.distributed is set up as an HCCL job's.
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "hccl")
    monkeypatch.delenv("HCCL_OP_EXPANSION_MODE", raising=False)
    step = FusedAttentionStep()
    graph = simulated_npu.make_graph("full")
    npu_simulator.faults.add("capture_end")
    with pytest.raises(hal.GraphHalError, match=r"AclmdlRICaptureEnd failed.*npu:0 holds \d+ NPU graphs now; each holds one of the device's about 2,048 streams.*HCCL_OP_EXPANSION_MODE=AIV"):
        with simulated_npu.capture_session(graph, simulated_npu.graph_pool()):
            step(**step.batch([1, 1]))
    assert_left_clean(npu_simulator)
