"""The CPU SIMULATOR of torch_npu's graph API (tests/support/npu_simulator), through torch_npu's own calls.

These pin what the simulator models, so that the npu plugin's tests prove something: host lengths are baked
into a capture, task groups and updates change them, and each way to get the order wrong on hardware (a
missing update, an update not ordered before the replay, an update racing the previous replay, a host read
inside a capture, a launch hidden from the capture) is reported instead of silently accepted.
"""

from __future__ import annotations

import sys

import pytest
import torch

from refmodel import decode_attention_reference
from support.npu_simulator import (
    HiddenLaunchError,
    HostReadDuringCaptureError,
    SimulatedHangError,
    SimulatorError,
    StaleHostValuesError,
    UpdateRaceError,
    installed,
)

pytestmark = pytest.mark.cpu

BATCH, HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, MAX_BLOCKS = 3, 4, 2, 8, 4, 3


@pytest.fixture
def torch_npu():
    """The simulated torch_npu module (tensors stay on the CPU)."""
    with installed():
        yield sys.modules["torch_npu"]


class AttentionCase:
    """Random decode-attention inputs: a paged cache, block tables, and an output buffer."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> None:
        generator = torch.Generator().manual_seed(seed)
        blocks = 1 + BATCH * MAX_BLOCKS
        self.q = torch.randn(BATCH, HEADS, HEAD_DIM, generator=generator).to(dtype)
        self.key_cache = torch.randn(blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=generator).to(dtype)
        self.value_cache = torch.randn(blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=generator).to(dtype)
        self.block_tables = torch.arange(1, blocks, dtype=torch.int32).view(BATCH, MAX_BLOCKS)
        self.out = torch.zeros_like(self.q)
        self.scale = HEAD_DIM**-0.5

    def fused(self, torch_npu, lengths: list[int]) -> torch.Tensor:
        """torch_npu.npu_fused_infer_attention_score over the case, as [batch, heads, head_dim]."""
        blocks = self.key_cache.shape[0]
        out, _ = torch_npu.npu_fused_infer_attention_score(
            self.q.reshape(BATCH, 1, HEADS * HEAD_DIM),
            self.key_cache.view(blocks, BLOCK_SIZE, KV_HEADS * HEAD_DIM),
            self.value_cache.view(blocks, BLOCK_SIZE, KV_HEADS * HEAD_DIM),
            block_table=self.block_tables,
            actual_seq_lengths_kv=lengths,
            num_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            scale=self.scale,
            input_layout="BSH",
            block_size=BLOCK_SIZE,
        )
        return out.view(BATCH, HEADS, HEAD_DIM)

    def paged(self, torch_npu, context_lens: torch.Tensor) -> None:
        """torch_npu._npu_paged_attention (no torch_npu capture handler) into ``self.out``."""
        torch_npu._npu_paged_attention(
            self.q, self.key_cache, self.value_cache, KV_HEADS, HEADS, self.scale, self.block_tables, context_lens,
            out=self.out,
        )

    def reference(self, lengths: list[int]) -> torch.Tensor:
        seq_lens = torch.tensor(lengths, dtype=torch.int32)
        return decode_attention_reference(self.q, self.key_cache, self.value_cache, self.block_tables, seq_lens, self.scale)


def capture_gated_paged_attention(torch_npu, case: AttentionCase, lengths: list[int]):
    """A graph holding one _npu_paged_attention launch in a task group gated by an ExternalEvent, the way the
    explicit update path brackets it. Returns (graph, handle, event)."""
    npu = torch_npu.npu
    graph = npu.NPUGraph()
    with npu.graph(graph):
        stream = npu.current_stream()
        event = npu.ExternalEvent()
        event.wait(stream)
        event.reset(stream)
        npu.graph_task_group_begin(stream)
        case.paged(torch_npu, torch.tensor(lengths, dtype=torch.int32))
        handle = npu.graph_task_group_end(stream)
    return graph, handle, event


def update_paged_attention(torch_npu, case: AttentionCase, stream, handle, event, lengths: list[int]) -> None:
    npu = torch_npu.npu
    with npu.stream(stream):
        npu.graph_task_update_begin(stream, handle)
        case.paged(torch_npu, torch.tensor(lengths, dtype=torch.int32))
        npu.graph_task_update_end(stream)
        event.record(stream)


# --- kernels --------------------------------------------------------------------------------------------


def test_fused_attention_equals_the_reference_and_empty_rows_are_zero(torch_npu):
    case = AttentionCase()
    lengths = [5, 0, MAX_BLOCKS * BLOCK_SIZE]
    torch.testing.assert_close(case.fused(torch_npu, lengths), case.reference(lengths), rtol=2e-2, atol=2e-2)
    assert case.fused(torch_npu, lengths)[1].abs().sum() == 0


def test_fused_attention_takes_float16_or_bfloat16_only(torch_npu):
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        AttentionCase(dtype=torch.float32).fused(torch_npu, [1, 1, 1])


# --- capture and update ---------------------------------------------------------------------------------


def test_lengths_captured_outside_a_task_group_are_baked_in_and_replaying_them_is_stale(torch_npu):
    case = AttentionCase()
    graph = torch_npu.npu.NPUGraph()
    with torch_npu.npu.graph(graph):  # no auto_dispatch_capture: nothing brackets the launch
        case.fused(torch_npu, [4, 4, 4])
    with pytest.raises(StaleHostValuesError, match=r"baked at capture.*no update can ever change them"):
        graph.replay()


def test_auto_dispatch_capture_and_npugraph_update_give_the_replay_new_lengths(torch_npu):
    case = AttentionCase()
    graph = torch_npu.npu.NPUGraph()
    with torch_npu.npu.graph(graph, auto_dispatch_capture=True):
        captured = case.fused(torch_npu, [12, 12, 12])
    assert torch.isnan(captured).all()  # captured work has not run: no values before the first replay
    for lengths in ([3, 7, 0], [9, 1, 12]):
        graph.update(cpu_update_input=[{"actual_seq_lengths_kv": lengths}])
        graph.replay()
        torch_npu.npu.synchronize()  # the host waits for the replay before reading (and before the next update)
        torch.testing.assert_close(captured, case.fused(torch_npu, lengths), rtol=0, atol=0)


def test_a_gated_task_replayed_without_an_update_is_a_simulated_hang(torch_npu):
    case = AttentionCase()
    graph = torch_npu.npu.NPUGraph()
    with torch_npu.npu.graph(graph, auto_dispatch_capture=True):
        case.fused(torch_npu, [12, 12, 12])
    with pytest.raises(SimulatedHangError, match="would hang"):
        graph.replay()  # never updated
    graph.update(cpu_update_input=[{"actual_seq_lengths_kv": [1, 2, 3]}])
    graph.replay()
    torch_npu.npu.synchronize()
    with pytest.raises(SimulatedHangError, match="no update recorded since the previous replay"):
        graph.replay()  # the update was consumed by the previous replay


def test_explicit_task_group_update_gives_the_replay_new_lengths(torch_npu):
    case = AttentionCase()
    graph, handle, event = capture_gated_paged_attention(torch_npu, case, [12, 12, 12])
    update_stream = torch_npu.npu.Stream()
    update_paged_attention(torch_npu, case, update_stream, handle, event, [5, 2, 9])
    graph.replay()
    torch.testing.assert_close(case.out, case.fused(torch_npu, [5, 2, 9]), rtol=0, atol=0)


def test_an_event_recorded_before_the_update_lets_the_replay_read_stale_lengths(torch_npu):
    case = AttentionCase()
    npu = torch_npu.npu
    graph, handle, event = capture_gated_paged_attention(torch_npu, case, [12, 12, 12])
    update_stream = npu.Stream()
    with npu.stream(update_stream):
        event.record(update_stream)  # releases the gated task before the update below lands
        npu.graph_task_update_begin(update_stream, handle)
        case.paged(torch_npu, torch.tensor([5, 2, 9], dtype=torch.int32))
        npu.graph_task_update_end(update_stream)
    with pytest.raises(StaleHostValuesError, match="is not ordered before it"):
        graph.replay()


def test_an_update_racing_the_previous_replay_is_caught_and_waiting_on_its_event_orders_it(torch_npu):
    case = AttentionCase()
    npu = torch_npu.npu
    graph, handle, event = capture_gated_paged_attention(torch_npu, case, [12, 12, 12])
    update_stream = npu.Stream()
    update_paged_attention(torch_npu, case, update_stream, handle, event, [5, 2, 9])
    graph.replay()
    with pytest.raises(UpdateRaceError, match=r"replay 1 of graph .* may not have finished"):
        update_paged_attention(torch_npu, case, update_stream, handle, event, [6, 3, 10])

    replayed = npu.Event()
    replayed.record(npu.current_stream())
    graph, handle, event = capture_gated_paged_attention(torch_npu, case, [12, 12, 12])
    for step, lengths in enumerate(([5, 2, 9], [6, 3, 10], [7, 4, 11])):
        if step:
            update_stream.wait_event(replayed)  # the update starts after the previous replay finished
        update_paged_attention(torch_npu, case, update_stream, handle, event, lengths)
        graph.replay()
        replayed.record(npu.current_stream())
        torch.testing.assert_close(case.out, case.fused(torch_npu, lengths), rtol=0, atol=0)


def test_an_update_may_change_host_arguments_only(torch_npu):
    case = AttentionCase()
    graph, handle, event = capture_gated_paged_attention(torch_npu, case, [12, 12, 12])
    update_stream = torch_npu.npu.Stream()
    case.q = case.q.clone()  # a different tensor than the captured launch reads
    with pytest.raises(SimulatorError, match="changed .*argument 'query': only its host arguments"):
        update_paged_attention(torch_npu, case, update_stream, handle, event, [1, 1, 1])


# --- what a capture may not do ----------------------------------------------------------------------------


@pytest.mark.parametrize("read", [lambda t: t.tolist(), lambda t: t.sum().item(), lambda t: t.numpy()])
def test_reading_tensor_values_on_the_host_during_capture_fails(torch_npu, read):
    lengths = torch.tensor([3, 4], dtype=torch.int32)
    read(lengths)  # fine outside a capture
    graph = torch_npu.npu.NPUGraph()
    with pytest.raises(HostReadDuringCaptureError, match="on the host while an NPU graph"):
        with torch_npu.npu.graph(graph):
            read(lengths)


@torch.library.custom_op("npu_simulator_test::wrapped_attention", mutates_args=("out",))
def wrapped_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor, out: torch.Tensor) -> None:
    """A custom op whose kernel launches the fused attention: no dispatch mode sees the inner launch."""
    torch_npu = sys.modules["torch_npu"]
    case = AttentionCase.__new__(AttentionCase)
    case.q, case.key_cache, case.value_cache, case.block_tables = q, key_cache, value_cache, block_tables
    case.scale = HEAD_DIM**-0.5
    out.copy_(case.fused(torch_npu, [4] * q.shape[0]))


def test_a_host_length_launch_hidden_inside_another_ops_kernel_is_refused_at_capture(torch_npu):
    case = AttentionCase()
    wrapped_attention(case.q, case.key_cache, case.value_cache, case.block_tables, case.out)  # eager: fine
    graph = torch_npu.npu.NPUGraph()
    with pytest.raises(HiddenLaunchError, match="inside npu_simulator_test.wrapped_attention.*no dispatch mode saw it"):
        with torch_npu.npu.graph(graph, auto_dispatch_capture=True):
            wrapped_attention(case.q, case.key_cache, case.value_cache, case.block_tables, case.out)


def test_graph_arguments_in_cudas_positional_order_are_refused(torch_npu):
    graph = torch_npu.npu.NPUGraph()
    with pytest.raises(TypeError, match="auto_dispatch_capture must be a bool.*pass them by keyword"):
        torch_npu.npu.graph(graph, None, None, "thread_local")


# --- installation -----------------------------------------------------------------------------------------


def test_installing_and_uninstalling_leaves_the_process_as_it_was():
    tolist = torch.Tensor.tolist
    assert "torch_npu" not in sys.modules and not hasattr(torch, "npu")
    with installed(version="2.9.1") as simulator:
        assert sys.modules["torch_npu"].__version__ == "2.9.1"
        assert "SIMULATOR" in sys.modules["torch_npu"].__simulator__
        assert torch.npu.is_available() and simulator.device_count == 1
    assert "torch_npu" not in sys.modules and "torch_npu.npu" not in sys.modules and not hasattr(torch, "npu")
    assert torch.Tensor.tolist is tolist
    with pytest.raises(SimulatorError, match="not installed"):
        from support.npu_simulator.state import current

        current()
