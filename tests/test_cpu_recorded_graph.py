"""The cpu device's graphs behave like captured device graphs, pitfalls included."""

from __future__ import annotations

import threading

import pytest
import torch

import hal
from devices.cpu.recorded_graph import HostSyncDuringCaptureError, RecordingPool
from support.dispatch_mode_flags import restored_dispatch_mode_flags  # noqa: F401 (a fixture)

pytestmark = pytest.mark.cpu


@pytest.fixture
def cpu() -> hal.Device:
    return hal.get_device("cpu")


def capture(device: hal.Device, step, *args):
    graph = device.make_graph("full")
    with device.capture_session(graph, device.graph_pool()):
        out = step(*args)
    return graph, out


def test_replay_reads_the_captured_input_tensors_and_refills_the_captured_outputs(cpu):
    x = torch.randn(4, 3)
    w = torch.randn(3, 2)
    graph, out = capture(cpu, lambda: torch.softmax(x @ w, dim=-1))
    x.copy_(torch.randn(4, 3))
    cpu.replay(graph)
    torch.testing.assert_close(out, torch.softmax(x @ w, dim=-1))


def test_a_python_value_read_at_capture_is_baked_in(cpu):
    x = torch.zeros(3)
    scale = {"value": 2.0}
    graph, out = capture(cpu, lambda: x * scale["value"])
    x.fill_(1.0)
    scale["value"] = 10.0  # a new host value: the graph does not see it, as on a GPU
    cpu.replay(graph)
    assert torch.equal(out, torch.full((3,), 2.0))


def test_a_new_tensor_passed_after_capture_is_not_read(cpu):
    inputs = {"x": torch.ones(2)}
    graph, out = capture(cpu, lambda: inputs["x"] + 1)
    inputs["x"] = torch.full((2,), 7.0)  # rebinding is invisible to the graph; only copy_ into x is seen
    cpu.replay(graph)
    assert torch.equal(out, torch.full((2,), 2.0))


def test_reading_a_device_value_on_the_host_during_capture_fails(cpu):
    x = torch.ones(3)
    graph = cpu.make_graph("full")
    with pytest.raises(HostSyncDuringCaptureError, match=r"_local_scalar_dense.*not permitted while a device graph"):
        with cpu.capture_session(graph, None):
            _ = x.sum().item()
    with pytest.raises(hal.GraphStateError, match="never captured"):
        cpu.replay(graph)  # nothing half-captured survives


def test_data_dependent_shapes_fail_during_capture(cpu):
    x = torch.tensor([0.0, 1.0, 2.0])
    graph = cpu.make_graph("full")
    with pytest.raises(HostSyncDuringCaptureError, match="nonzero"):
        with cpu.capture_session(graph, None):
            torch.nonzero(x)


def test_indexing_with_integer_tensors_is_captured_and_replayed(cpu):
    # aten.index.Tensor carries the dynamic-output-shape tag for boolean masks only; with integer indices its
    # shape follows from theirs and a CUDA graph captures it (transformers builds attention masks so).
    x = torch.arange(12.0).reshape(3, 4)
    rows, cols = torch.tensor([2, 0]), torch.tensor([1, 3])
    graph, out = capture(cpu, lambda: x[rows[:, None], cols[None, :]])
    x.copy_(-x)
    rows.copy_(torch.tensor([1, 1]))
    cpu.replay(graph)
    assert torch.equal(out, (-torch.arange(12.0).reshape(3, 4))[torch.tensor([1, 1])[:, None], cols[None, :]])


def test_indexing_with_a_boolean_mask_fails_during_capture(cpu):
    x = torch.arange(4.0)
    graph = cpu.make_graph("full")
    with pytest.raises(HostSyncDuringCaptureError, match=r"aten.index.Tensor reads a device value"):
        with cpu.capture_session(graph, None):
            x[x > 1]


def test_in_place_writes_are_repeated_on_every_replay(cpu):
    cache = torch.zeros(6)
    slots = torch.tensor([1])
    values = torch.tensor([5.0])
    graph, _ = capture(cpu, lambda: cache.index_copy_(0, slots, values))
    slots.fill_(4)
    values.fill_(9.0)
    cpu.replay(graph)
    assert cache.tolist() == [0.0, 5.0, 0.0, 0.0, 9.0, 0.0]


def test_views_of_recorded_tensors_follow_them(cpu):
    x = torch.arange(6.0)
    graph, out = capture(cpu, lambda: (x * 2).view(2, 3)[1])
    x.fill_(1.0)
    cpu.replay(graph)
    assert out.tolist() == [2.0, 2.0, 2.0]


@pytest.mark.parametrize(
    "convert",
    [
        pytest.param(lambda t: t.float(), id="to-dtype"),  # transformers' rotary embedding: positions.float()
        pytest.param(lambda t: t.t().contiguous(), id="contiguous"),
        pytest.param(lambda t: t.t().reshape(-1), id="reshape"),
    ],
)
def test_ops_that_may_alias_but_copy_are_recomputed(cpu, convert):
    # aten.to, contiguous and reshape declare their result an alias of the input (they return it when
    # nothing needs converting); when they copy, a device graph runs the copy kernel on every replay.
    x = torch.arange(6).reshape(2, 3)
    with torch.inference_mode():  # where transformers' steps run: these ops reach the recorder undecomposed
        graph, out = capture(cpu, lambda: convert(x) * 1)
        x.copy_(torch.arange(6, 12).reshape(2, 3))
        cpu.replay(graph)
        assert torch.equal(out, convert(x) * 1)


def test_in_place_metadata_changes_are_not_replayed(cpu):
    x = torch.ones(4)

    def step():
        y = x + 1
        y.unsqueeze_(0)  # changes only shape and strides: a device graph never replays that
        return y

    graph, out = capture(cpu, step)
    cpu.replay(graph)
    cpu.replay(graph)
    assert out.shape == (1, 4) and out.tolist() == [[2.0, 2.0, 2.0, 2.0]]


def test_outputs_are_overwritten_by_the_next_replay(cpu):
    x = torch.ones(2)
    graph, out = capture(cpu, lambda: x + 1)
    cpu.replay(graph)
    first = out
    x.fill_(10.0)
    cpu.replay(graph)
    assert first is out and first.tolist() == [11.0, 11.0]


MIB = 1 << 20


def test_the_pool_reserves_segments_of_the_sizes_the_cuda_caching_allocator_does(cpu):
    # What a capture report and a pool budget read on a GPU: segments, not tensors. A request up to 1 MiB
    # comes from a 2 MiB segment, one up to 10 MiB from a 20 MiB segment, a larger one from a segment of its
    # own rounded up to 2 MiB.
    for tensor_bytes, pool_bytes in ((4096, 2 * MIB), (3 * MIB, 20 * MIB), (12 * MIB + 4, 14 * MIB)):
        x = torch.ones(tensor_bytes // 4)
        pool = cpu.graph_pool()
        graph = cpu.make_graph("full")
        with cpu.capture_session(graph, pool):
            _ = x * 2
        assert cpu.memory_stats(pool).pool_bytes == pool_bytes, tensor_bytes


def test_the_pool_packs_blocks_into_a_segment_and_hands_out_the_smallest_free_one_that_fits():
    pool = RecordingPool()
    first, second, third = (pool.allocate_like(torch.empty(1024)) for _ in range(3))  # 4 KiB each
    start = first.data_ptr()
    assert (second.data_ptr(), third.data_ptr()) == (start + 4096, start + 8192)  # one segment, front to back
    del first
    smaller = pool.allocate_like(torch.empty(100))  # best fit: the 4 KiB hole, not the rest of the segment
    assert smaller.data_ptr() == start
    del second, third, smaller
    whole = pool.allocate_like(torch.empty(3 * 1024))  # the freed blocks merged back into one
    assert whole.data_ptr() == start and pool.bytes == 2 * MIB


def test_a_graph_is_captured_once(cpu):
    graph, _ = capture(cpu, lambda: torch.ones(1) + 1)
    with pytest.raises(hal.GraphStateError, match="already captured"):
        with cpu.capture_session(graph, None):
            pass


# --- torch.compile in other threads -------------------------------------------------------------------------


def compiles_here() -> bool:
    """Whether torch.compile, called on this thread, hands a fresh function to its backend."""
    torch._dynamo.reset()
    compiled = []
    torch.compile(lambda x: x * 2 + 1, backend=lambda gm, inputs: compiled.append(gm) or gm)(torch.ones(3))
    return bool(compiled)


def hold_a_capture(cpu: hal.Device, inside: threading.Event, leave: threading.Event) -> None:
    graph = cpu.make_graph("full")
    with cpu.capture_session(graph, cpu.graph_pool()):
        _ = torch.ones(2) + 1
        inside.set()
        leave.wait(30)


def test_a_capture_on_one_thread_leaves_torch_compile_working_on_the_others(cpu):
    # torch 2.10 and earlier read one flag of the process for "a dispatch mode is active", not the thread's
    # stack: a capture's modes must stay off it (devices.cpu.recorded_graph._ThreadLocalMode).
    inside, leave = threading.Event(), threading.Event()
    other = threading.Thread(target=hold_a_capture, args=(cpu, inside, leave))
    other.start()
    try:
        assert inside.wait(30)
        assert compiles_here()
    finally:
        leave.set()
        other.join()


def test_captures_of_two_threads_ending_out_of_order_leave_torch_compile_working(cpu, restored_dispatch_mode_flags):
    # Each mode restores, on exit, the flag it found on entry: other thread in, this thread in, other thread
    # out, this thread out would leave it set for the rest of the process.
    inside, leave = threading.Event(), threading.Event()
    other = threading.Thread(target=hold_a_capture, args=(cpu, inside, leave))
    other.start()
    assert inside.wait(30)
    graph = cpu.make_graph("full")
    with cpu.capture_session(graph, cpu.graph_pool()):
        leave.set()
        other.join()
    assert compiles_here()
