"""The graph budget against an Ascend device's streams, on the CPU SIMULATOR: a capture counts the graphs one
bucket takes (pieces per bucket in piecewise and breakable), thins the default buckets to what the device has
left, and refuses buckets the caller chose, with the numbers; the graphs it keeps still equal eager."""

from __future__ import annotations

import gc
from dataclasses import replace

import pytest
import torch

import hal
from devices.npu import stream_budget
from graphhal.paged_attention import PagedKVCache
from graphhal.refmodel import DecodeWorkload, LlamaDecoder, ModelConfig
from runners import DecodeConfig, DecodeRunner
from runners.graph_budget import GraphBudgetError, spread
from support.npu_simulator.fixture import npu_simulated_on_cpu

pytestmark = pytest.mark.cpu

CONFIG = replace(ModelConfig.tiny(), block_size=16)
DTYPE = torch.bfloat16
MAX_BS = 8


def _runner(device: hal.Device, mode: str, buckets: list[int] | None = None) -> tuple[DecodeRunner, DecodeWorkload, object]:
    cache = PagedKVCache(CONFIG, 1 + MAX_BS * CONFIG.max_blocks_per_seq, device.torch_device, DTYPE)
    step = LlamaDecoder(CONFIG, device.torch_device, DTYPE, seed=0).decode_forward(cache)
    workload = DecodeWorkload(cache, MAX_BS, max_context_len=CONFIG.max_seq_len // 2, seed=1, conventions=device.conventions)
    config = DecodeConfig(mode=mode, max_bs=MAX_BS, buckets=buckets, compiler="eager" if mode == "piecewise" else None, show_progress=False)
    return DecodeRunner(step, workload.input_slots(), device, config), workload, step


def test_an_npu_device_answers_its_budget_from_the_graphs_alive(monkeypatch):
    monkeypatch.setenv(stream_budget.LIMIT_VARIABLE, "10")
    with npu_simulated_on_cpu():
        device = hal.DeviceRegistry(load_entry_points=False).get_device("npu")
        assert device.graph_budget() == 10
        graphs = [device.make_graph("full") for _ in range(3)]
        assert device.graph_budget() == 7
        del graphs
        assert device.graph_budget() == 10
    assert hal.get_device("cpu").graph_budget() is None  # no limit where a device names none


@pytest.mark.parametrize("mode", ["piecewise", "breakable"])
def test_default_buckets_are_thinned_to_the_budget_and_still_equal_eager(mode, monkeypatch):
    torch._dynamo.reset()
    with npu_simulated_on_cpu():
        device = hal.DeviceRegistry(load_entry_points=False).get_device("npu")
        # Unlimited first: how many graphs one bucket takes in this mode (pieces or segments: about the layers).
        runner, _, _ = _runner(device, mode)
        runner.capture()
        per_bucket = device.plugin_graphs_made // len(runner.report.buckets)
        assert per_bucket >= CONFIG.num_layers  # split at every attention
        del runner
        torch._dynamo.reset()
        gc.collect()  # the first runner's graphs (in reference cycles) let go of their streams
        monkeypatch.setenv(stream_budget.LIMIT_VARIABLE, str(per_bucket * 3))
        runner, workload, step = _runner(device, mode)  # default buckets 1, 2, 4, 8
        report = runner.capture()
        assert report.buckets == (8, 2, 1)  # three fit: the largest, the smallest, one between
        for rows in (1, 3, 5, 8):
            batch = workload.batch(rows)
            with torch.no_grad():
                eager = step(**batch).clone()
            torch.testing.assert_close(runner.run(batch).clone(), eager, rtol=2e-2, atol=2e-2)


def test_buckets_the_caller_chose_are_refused_with_the_numbers(monkeypatch):
    monkeypatch.setenv(stream_budget.LIMIT_VARIABLE, "2")
    with npu_simulated_on_cpu():
        device = hal.DeviceRegistry(load_entry_points=False).get_device("npu")
        runner, _, _ = _runner(device, "full", buckets=[2, 5, 8])
        with pytest.raises(
            GraphBudgetError,
            match=r"3 decode buckets in mode full need 3 graphs on npu \(1 per bucket\), which has room for 2 more; "
            r"each graph holds one of the device's streams.*Capture at most 2 buckets \(for instance \[2, 8\]\)",
        ):
            runner.capture()
        assert device.graph_budget() == 2  # the graph of the largest bucket was let go


def test_not_even_one_bucket_fitting_is_refused_saying_full_takes_one_graph(monkeypatch):
    with npu_simulated_on_cpu():
        device = hal.DeviceRegistry(load_entry_points=False).get_device("npu")
        monkeypatch.setenv(stream_budget.LIMIT_VARIABLE, "2")
        runner, _, _ = _runner(device, "breakable")
        with pytest.raises(GraphBudgetError, match=r"not even one bucket fits.*mode full takes one graph per bucket") as error:
            runner.capture()
        assert "HCCL" not in str(error.value)


@pytest.mark.parametrize(
    ("keep", "kept"), [(1, [8]), (2, [8, 1]), (3, [8, 2, 1]), (4, [8, 4, 2, 1]), (9, [8, 4, 2, 1])]
)
def test_spread_keeps_the_largest_and_the_smallest(keep, kept):
    assert spread([8, 4, 2, 1], keep) == kept
