"""A device's own all-reduce (``hal_all_reducer``): asked once per group before capture, then for every
message of graphhal's all-reduce, in graphs and eagerly; what it declines goes to ``torch.distributed``.

On the cpu, a plugin registered in code serves the cpu device with an all-reducer of its own that sums over
gloo like the default path but takes only messages up to a size and counts them: the ranks' graphs then
replay through it for small batches and through ``torch.distributed`` for large ones, with the same results.
The symmetric-memory kernels the cuda device offers need two GPUs (the ``cuda`` cases).
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch
import torch.distributed as dist

import devices.cpu
import hal
from graphhal.paged_attention import PagedKVCache, decode_input_slots
from graphhal.refmodel import DecodeWorkload, LlamaDecoder, ModelConfig
from graphhal.refmodel.tensor_parallel import use_device_all_reduce
from runners import DecodeConfig, DecodeRunner
from support.spawn_ranks import run_on_ranks

SMALL_BYTES = 1024  # a batch-1 message of the tiny model (hidden 64, float32: 256 B) fits; batch 8 (2 KiB) does not


class SizeLimitedSum:
    """An all-reducer that sums messages up to ``limit`` bytes over gloo and counts them by rows."""

    def __init__(self, group, limit: int) -> None:
        self.group, self.limit, self.rows = group, limit, Counter()

    def reduce(self, partial: torch.Tensor) -> torch.Tensor | None:
        if partial.numel() * partial.element_size() > self.limit:
            return None
        self.rows[partial.shape[0]] += 1
        summed = partial.clone()
        dist.all_reduce(summed, group=self.group)
        return summed

    def describe(self) -> str:
        return f"a sum over gloo up to {self.limit} bytes"


class CpuWithItsOwnAllReduce:
    """The cpu device's plugin, plus ``hal_all_reducer`` (a plugin registered in code, not a mock: the
    registry binds these hooks as it binds any plugin's)."""

    def __init__(self, answer) -> None:
        for name in dir(devices.cpu):
            if name.startswith("hal_"):
                setattr(self, name, getattr(devices.cpu, name))
        self.answer = answer

    @hal.hookimpl
    def hal_all_reducer(self, device, group):
        return self.answer(group)


def cpu_device_with(answer) -> hal.Device:
    registry = hal.DeviceRegistry(builtin_plugins=(), load_entry_points=False)
    registry.register(CpuWithItsOwnAllReduce(answer), "cpu-with-its-own-all-reduce")
    return registry.get_device("cpu")


def graphs_through_the_device_all_reduce(rank: int, world_size: int) -> dict:
    device = cpu_device_with(lambda group: SizeLimitedSum(group, SMALL_BYTES))
    reducer = use_device_all_reduce(dist.group.WORLD, device)
    assert use_device_all_reduce(dist.group.WORLD, device) is reducer  # once per group
    config = ModelConfig.tiny()
    model = LlamaDecoder(config, "cpu", torch.float32, seed=0, tp_group=dist.group.WORLD)
    cache = PagedKVCache(model.local_config, 64, "cpu", torch.float32)
    runner = DecodeRunner(
        model.decode_forward(cache), decode_input_slots(config), device,
        DecodeConfig(mode="full", buckets=[1, 8], show_progress=False), group=dist.group.WORLD,
    )
    runner.capture()
    workload = DecodeWorkload(cache, 8, max_context_len=12, seed=1)
    reducer.rows.clear()  # from here on: replays only
    worst = 0.0
    for rows in (1, 8):
        batch = workload.batch(rows)
        replayed = runner.run(batch).clone()
        with torch.no_grad():
            worst = max(worst, (replayed - model.decode_forward(cache)(**batch)).abs().max().item())
    runner.close()
    return {"describe": reducer.describe(), "rows": dict(reducer.rows), "worst": worst, "layers": config.num_layers}


@pytest.mark.cpu
def test_a_device_all_reduce_takes_the_small_messages_of_replayed_graphs_and_torch_distributed_the_rest():
    for outcome in run_on_ranks(graphs_through_the_device_all_reduce, backend="gloo", timeout_s=240):
        assert outcome["describe"] == f"a sum over gloo up to {SMALL_BYTES} bytes"
        # Batch 1: two all-reduces a layer at the replay and two at the eager check after it, through the
        # device's reducer; batch 8's messages (2 KiB) went to torch.distributed.
        assert outcome["rows"] == {1: 4 * outcome["layers"]}
        assert outcome["worst"] < 1e-5


def _whatever_the_group(group):
    return object()


@pytest.mark.cpu
def test_a_plugin_answering_with_something_else_is_named():
    device = cpu_device_with(_whatever_the_group)
    with pytest.raises(hal.PluginContractError, match=r"cpu-with-its-own-all-reduce.*hal_all_reducer.*reduce and describe"):
        device.all_reducer(None)


@pytest.mark.cpu
def test_without_a_group_nothing_is_asked():
    asked = []
    device = cpu_device_with(lambda group: asked.append(group))
    assert use_device_all_reduce(None, device) is None and asked == []
    assert hal.get_device("cpu").all_reducer(None) is None  # the cpu device's own answer: torch.distributed


def symmetric_memory_against_nccl(rank: int, world_size: int) -> dict:
    os.environ["GRAPHHAL_SYMM_MEM"] = "1"  # off by default until this test has passed on two GPUs
    device = hal.get_device(f"cuda:{rank}")
    reducer = device.all_reducer(dist.group.WORLD)
    assert reducer is not None, "two GPUs with peer access: the cuda device offers symmetric memory"
    results = {"describe": reducer.describe()}
    for dtype in (torch.float32, torch.bfloat16):
        for numel in (2048, 65536, 1 << 20):  # float32: 8 KiB one-shot, 256 KiB and 4 MiB two-shot (bf16: half)
            partial = torch.randn(numel, device=device.torch_device, generator=torch.Generator(device.torch_device).manual_seed(rank)).to(dtype)
            offset = torch.cat([partial[:1], partial])[1:]  # storage offset 1: one-shot cannot take it, two-shot does
            expected = partial.clone()
            dist.all_reduce(expected)
            summed = reducer.reduce(partial)
            # Captured, then replayed on new values: the kernels hold no host state between calls.
            graph, replay_input = torch.cuda.CUDAGraph(), partial.clone()
            with torch.cuda.graph(graph):
                captured = reducer.reduce(replay_input)
            replay_input.mul_(2)
            graph.replay()
            results[f"{dtype} {numel}"] = (
                (summed.float() - expected.float()).abs().max().item(),
                (captured.float() - 2 * expected.float()).abs().max().item(),
            )
            results[f"{dtype} {numel} at an offset"] = ((reducer.reduce(offset).float() - expected.float()).abs().max().item(), 0.0)
    results["float16 declined"] = reducer.reduce(torch.ones(64, dtype=torch.float16, device=device.torch_device)) is None
    return results


@pytest.mark.cuda
@pytest.mark.gpus(2)
def test_symmetric_memory_sums_like_nccl_eagerly_and_replayed():
    for outcome in run_on_ranks(symmetric_memory_against_nccl, backend="nccl", timeout_s=240):
        assert outcome.pop("describe").startswith("symmetric memory") and outcome.pop("float16 declined")
        for case, (eager, replayed) in outcome.items():
            tolerance = 0.05 if "bfloat16" in case else 1e-5  # bf16 adds in bf16, in rank order
            assert eager <= tolerance and replayed <= 2 * tolerance, (case, eager, replayed)
