"""Breakable graphs: captured segments with eager steps at the break points, on cpu and cuda."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hal
from hal.breakable import BreakInFullGraphError, BreakResultMismatchError, SegmentEndError
from graphhal.paged_attention import PagedKVCache
from graphhal.refmodel import DecodeWorkload, LlamaDecoder, ModelConfig
from runners import DecodeConfig, DecodeRunner, InputSlot

CALLS: list[str] = []


@hal.break_point
def scale_by_host_max(x: torch.Tensor) -> torch.Tensor:
    """Reads a device value on the host: illegal inside any capture, fine at a break."""
    CALLS.append("scale_by_host_max")
    return x * float(x.abs().max().item())


@hal.break_point(enabled=False)
def disabled_double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def capture(device: hal.Device, step, pool=None):
    graph = device.make_graph("breakable")
    with device.capture_session(graph, pool if pool is not None else device.graph_pool()):
        out = step()
    return graph, out


def test_no_break_is_one_segment_that_follows_new_inputs(graph_device):
    device = hal.get_device(graph_device)
    x = torch.randn(4, device=device.torch_device)
    graph, out = capture(device, lambda: torch.sin(x) + 1)
    assert graph.num_breaks == 0
    x.copy_(torch.randn(4))
    device.replay(graph)
    torch.testing.assert_close(out, torch.sin(x) + 1)


def test_one_break_runs_eagerly_between_segments_with_the_new_inputs(graph_device):
    device = hal.get_device(graph_device)
    x = torch.randn(5, device=device.torch_device)
    graph, out = capture(device, lambda: scale_by_host_max(x + 1) - 3)
    assert graph.num_breaks == 1
    x.copy_(torch.randn(5))
    CALLS.clear()
    device.replay(graph)
    assert CALLS == ["scale_by_host_max"]
    torch.testing.assert_close(out, (x + 1) * (x + 1).abs().max() - 3)


def test_chained_breaks_with_empty_segments_between_them(graph_device):
    device = hal.get_device(graph_device)
    x = torch.randn(3, device=device.torch_device)
    graph, out = capture(device, lambda: scale_by_host_max(scale_by_host_max(x)) + 1)
    assert graph.num_breaks == 2
    x.copy_(torch.randn(3))
    device.replay(graph)
    once = x * x.abs().max()
    torch.testing.assert_close(out, once * once.abs().max() + 1)


def test_a_disabled_break_point_is_captured_inline(graph_device):
    device = hal.get_device(graph_device)
    x = torch.randn(3, device=device.torch_device)
    graph, out = capture(device, lambda: disabled_double(x) + 1)
    assert graph.num_breaks == 0
    x.fill_(2.0)
    device.replay(graph)
    torch.testing.assert_close(out, torch.full_like(x, 5.0))


def test_the_break_sees_real_values_at_capture(graph_device):
    """On devices that only record during capture the segment is run before the break, not read as garbage."""
    device = hal.get_device(graph_device)
    x = torch.arange(4.0, device=device.torch_device)
    seen = []

    @hal.break_point
    def record_host_sum(t):
        seen.append(t.sum().item())
        return t

    capture(device, lambda: record_host_sum(x + 1) * 2)
    assert seen == [10.0]


def test_a_break_point_can_be_a_method(graph_device):
    device = hal.get_device(graph_device)

    class Attention:
        scale = 3.0

        @hal.break_point
        def attend(self, q):
            return q * self.scale

    x = torch.ones(2, device=device.torch_device)
    graph, out = capture(device, lambda: Attention().attend(x) + 1)
    assert graph.num_breaks == 1
    x.fill_(2.0)
    device.replay(graph)
    assert out.tolist() == [7.0, 7.0]


def test_a_host_value_returned_by_a_break_must_not_change_at_replay(graph_device):
    device = hal.get_device(graph_device)
    length = [3]

    @hal.break_point(name="current_length")
    def current_length():
        return length[0]

    x = torch.ones(2, device=device.torch_device)
    graph, _ = capture(device, lambda: x * current_length())
    length[0] = 5  # the segment after the break baked in 3
    with pytest.raises(BreakResultMismatchError, match=r"break point 'current_length': returned 5 at replay but 3"):
        device.replay(graph)


def test_break_graph_in_a_full_capture_is_a_no_op(graph_device):
    device = hal.get_device(graph_device)
    x = torch.ones(2, device=device.torch_device)
    graph = device.make_graph("full")
    with device.capture_session(graph, device.graph_pool()):
        y = x * 2
        hal.break_graph()
        out = y + 1
    x.fill_(2.0)
    device.replay(graph)
    assert out.tolist() == [5.0, 5.0]


def test_break_points_outside_a_capture_are_plain_calls():
    CALLS.clear()
    x = torch.tensor([1.0, -3.0])
    assert scale_by_host_max(x).tolist() == [3.0, -9.0]
    assert CALLS == ["scale_by_host_max"]
    hal.break_graph()  # a no-op outside a capture


def test_break_graph_forces_a_cut(graph_device):
    device = hal.get_device(graph_device)
    x = torch.randn(3, device=device.torch_device)

    def step():
        y = x * 2
        hal.break_graph()
        return y + 1

    graph, out = capture(device, step)
    assert graph.num_breaks == 1
    x.fill_(1.0)
    device.replay(graph)
    torch.testing.assert_close(out, torch.full_like(x, 3.0))


def test_copy_back_of_tensor_dict_object_and_plain_results(graph_device):
    device = hal.get_device(graph_device)
    x = torch.randn(4, device=device.torch_device)

    @hal.break_point
    def many_kinds(t):
        return {"doubled": t * 2, "parts": (t + 1, SimpleNamespace(neg=-t, label="neg")), "count": 7}

    def step():
        result = many_kinds(x * 1)
        assert result["count"] == 7  # a plain value is handed back as is
        return result["doubled"] + result["parts"][0] + result["parts"][1].neg

    graph, out = capture(device, step)
    x.copy_(torch.randn(4))
    device.replay(graph)
    torch.testing.assert_close(out, x * 2 + (x + 1) - x)


def test_a_required_break_in_a_full_capture_names_it_and_suggests_breakable(graph_device):
    device = hal.get_device(graph_device)
    x = torch.randn(3, device=device.torch_device)
    graph = device.make_graph("full")
    with pytest.raises(BreakInFullGraphError, match=r"'test_breakable_graph\.scale_by_host_max'.*'full'.*use mode 'breakable'"):
        with device.capture_session(graph, device.graph_pool()):
            scale_by_host_max(x)


def test_a_break_returning_another_shape_at_replay_is_an_error_naming_it(graph_device):
    device = hal.get_device(graph_device)
    sizes = [3]

    @hal.break_point(name="shape_shifter")
    def shape_shifter():
        return torch.zeros(sizes[0], device=device.torch_device)

    graph, _ = capture(device, lambda: shape_shifter() + 1)
    sizes[0] = 4
    with pytest.raises(BreakResultMismatchError, match=r"break point 'shape_shifter': returned \(4,\).*but \(3,\)"):
        device.replay(graph)


def test_a_failing_break_drops_the_capture_and_the_device_captures_again(graph_device):
    device = hal.get_device(graph_device)
    x = torch.randn(3, device=device.torch_device)

    @hal.break_point
    def fails(t):
        raise RuntimeError("varlen kernel not found")

    graph = device.make_graph("breakable")
    with pytest.raises(RuntimeError, match="varlen kernel not found"):
        with device.capture_session(graph, device.graph_pool()):
            fails(x + 1)
    assert graph.steps == [] and not graph.captured
    again, out = capture(device, lambda: scale_by_host_max(x) + 1)
    device.replay(again)
    torch.testing.assert_close(out, x * x.abs().max() + 1)


@pytest.mark.cuda
def test_a_side_stream_left_unjoined_at_a_break_fails_clearly():
    device = hal.get_device("cuda")
    x = torch.randn(1024, device="cuda")
    side = torch.cuda.Stream()

    def step():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            y = x * 2  # forked, never joined back
        return scale_by_host_max(y)

    graph = device.make_graph("breakable")
    with pytest.raises(SegmentEndError, match=r"(?s)before break point '.*scale_by_host_max'.*join it back"):
        with device.capture_session(graph, device.graph_pool()):
            step()
    torch.cuda.synchronize()
    fresh = torch.randn(1024, device="cuda")  # eager work, RNG included, still runs
    again, out = capture(device, lambda: fresh + x)  # and the device captures again
    device.replay(again)
    torch.testing.assert_close(out, fresh + x)


# --- through DecodeRunner -----------------------------------------------------------------------------------


def test_smaller_buckets_captured_later_do_not_corrupt_the_larger_one(graph_device):
    """sglang issue 37606: tensors crossing a break must stay referenced per bucket, or a later, smaller
    bucket's capture reuses their pool memory and the larger bucket replays garbage."""
    device = hal.get_device(graph_device)
    weight = torch.randn(16, 16, device=device.torch_device)

    @hal.break_point
    def renormalise(h):
        return h / h.norm(dim=-1, keepdim=True).clamp_min(1e-3)

    def step(*, x):
        hidden = torch.relu(x @ weight)  # allocated in the pool, crosses the break
        hidden = renormalise(hidden) + hidden
        return torch.tanh(hidden @ weight)

    runner = DecodeRunner(step, [InputSlot("x", torch.float32, (16,))], device, DecodeConfig(mode="breakable", buckets=[1, 2, 4, 8], show_progress=False))
    runner.capture()
    batch = {"x": torch.randn(8, 16, device=device.torch_device)}
    torch.testing.assert_close(runner.run(batch), step(**batch))


def test_debug_mode_runs_the_whole_forward_as_one_eager_step(graph_device):
    device = hal.get_device(graph_device)
    weight = torch.randn(4, 4, device=device.torch_device)

    def step(*, x):
        return {"y": x @ weight, "z": (x.sum(-1),)}

    runner = DecodeRunner(
        step, [InputSlot("x", torch.float32, (4,))], device,
        DecodeConfig(mode="breakable", max_bs=4, breakable_debug=True, show_progress=False),
    )
    runner.capture()
    assert all(bucket.graph.num_breaks == 1 for bucket in runner.graphs.values())
    batch = {"x": torch.randn(3, 4, device=device.torch_device)}
    out = runner.run(batch)
    torch.testing.assert_close(out["y"], step(**batch)["y"])
    torch.testing.assert_close(out["z"][0], step(**batch)["z"][0])


class BreakableDecoder:
    def __init__(self, device_name: str) -> None:
        device = hal.get_device(device_name)
        config = ModelConfig.tiny()
        self.kv_cache = PagedKVCache(config, 1 + 16 * config.max_blocks_per_seq, device.torch_device, torch.float32)
        self.step = LlamaDecoder(config, device.torch_device, torch.float32, seed=0).decode_forward(self.kv_cache)
        self.workload = DecodeWorkload(self.kv_cache, 16, max_context_len=config.max_seq_len - 1, seed=2)
        self.runner = DecodeRunner(self.step, self.workload.input_slots(), device, DecodeConfig(mode="breakable", max_bs=16, show_progress=False))
        self.runner.capture()


@pytest.fixture(scope="module", params=[pytest.param("cpu", marks=pytest.mark.cpu), pytest.param("cuda", marks=pytest.mark.cuda)])
def breakable_decoder(request: pytest.FixtureRequest) -> BreakableDecoder:
    if not hal.default_registry().is_available(request.param):
        pytest.skip(f"device {request.param!r} is not available here")
    return BreakableDecoder(request.param)


def test_reference_decoder_breaks_once_per_layer_at_attention(breakable_decoder: BreakableDecoder):
    graphs = breakable_decoder.runner.graphs
    assert {bucket.graph.num_breaks for bucket in graphs.values()} == {ModelConfig.tiny().num_layers}


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(min_value=1, max_value=16))
def test_breakable_decode_equals_eager_for_random_batches(breakable_decoder: BreakableDecoder, rows: int):
    batch = breakable_decoder.workload.batch(rows)
    with torch.no_grad():
        eager = breakable_decoder.step(**batch).clone()
    torch.testing.assert_close(breakable_decoder.runner.run(batch), eager, rtol=1e-4, atol=1e-4)
