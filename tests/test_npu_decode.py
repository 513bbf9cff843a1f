"""The reference decoder on the npu device, through DecodeRunner: on the CPU SIMULATOR of torch_npu, and
on Ascend hardware where there is one (the ``npu`` marker; skipped elsewhere).

Decode attention runs torch_npu's fused infer-attention op with host lengths, so every replay depends on
the plugin updating those lengths before it, in order. Graph output equals eager output while the lengths
change every step; a replay without its update, or an update not ordered after the previous replay, fails
loudly; the int32 cache locations and zero-padded lengths the npu's conventions ask for reach the model.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator

import pytest
import torch

import hal
from devices.npu import graph_update
from devices.npu.npu_graph import MissingUpdateError
from graphhal.paged_attention import PagedKVCache
from graphhal.refmodel import DecodeWorkload, LlamaDecoder, ModelConfig
from runners import DecodeConfig, DecodeRunner
from support.npu_simulator import SimulatedHangError, SimulatorState, UpdateRaceError
from support.npu_simulator.fixture import (  # noqa: F401 (fixtures)
    PROFILE_PARAMS,
    npu_profile,
    npu_simulated_on_cpu,
    npu_simulator,
    simulated_npu,
)

MAX_BS = 8
BUCKETS = [1, 2, 4, 8]
DTYPE = torch.bfloat16  # the fused attention op takes float16 or bfloat16
CONFIG = replace(ModelConfig.tiny(), block_size=16)  # the fused op's paged cache takes blocks of 16n tokens


@pytest.fixture(
    params=[
        *(pytest.param(param.values[0], id=param.id, marks=pytest.mark.cpu) for param in PROFILE_PARAMS),
        pytest.param("hardware", marks=pytest.mark.npu),
    ]
)
def npu(request: pytest.FixtureRequest) -> Iterator[tuple[hal.Device, SimulatorState | None]]:
    """The npu device, and the simulator's state when it runs on the simulator of one torch_npu line (None on
    hardware)."""
    if request.param == "hardware":
        yield hal.get_device("npu"), None
        return
    with npu_simulated_on_cpu(request.param) as simulator:
        yield hal.DeviceRegistry(load_entry_points=False).get_device("npu"), simulator


class NpuDecoder:
    """The tiny reference decoder in bfloat16 on ``device``, its cache, MAX_BS requests and a runner."""

    def __init__(self, device: hal.Device, mode: str = "full", seed: int = 0) -> None:
        config = CONFIG
        self.device = device
        self.kv_cache = PagedKVCache(config, 1 + MAX_BS * config.max_blocks_per_seq, device.torch_device, DTYPE)
        self.step = LlamaDecoder(config, device.torch_device, DTYPE, seed=seed).decode_forward(self.kv_cache)
        self.workload = DecodeWorkload(
            self.kv_cache, MAX_BS, max_context_len=config.max_seq_len // 2, seed=seed + 1, conventions=device.conventions
        )
        self.runner = DecodeRunner(
            self.step, self.workload.input_slots(), device, DecodeConfig(mode=mode, buckets=BUCKETS, show_progress=False)
        )
        self.runner.capture()

    def step_both(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Eager and graph logits of one decode step over the first ``rows`` requests (same cache writes)."""
        batch = self.workload.batch(rows)
        with torch.no_grad():
            eager = self.step(**batch).clone()
        graph = self.runner.run(batch).clone()
        return eager, graph, batch


def bucket_of(rows: int) -> int:
    return next(bucket for bucket in BUCKETS if bucket >= rows)


def last_replayed_lengths(simulator: SimulatorState) -> tuple[int, ...]:
    return [launch for launch in simulator.launches if launch.phase == "replay"][-1].lengths


def test_decode_on_npu_equals_eager_for_random_batches_with_lengths_changing_every_step(npu):
    device, simulator = npu
    decoder = NpuDecoder(device)
    generator = torch.Generator().manual_seed(7)
    random_rows = torch.randint(1, MAX_BS + 1, (10,), generator=generator).tolist()
    seen_buckets = set()
    for rows in [*random_rows, 1, MAX_BS]:
        eager, graph, batch = decoder.step_both(rows)
        torch.testing.assert_close(graph, eager, rtol=2e-2, atol=2e-2)
        if simulator is not None:  # the attention replayed with this step's lengths, padded with zeros
            padding = bucket_of(rows) - rows
            assert last_replayed_lengths(simulator) == tuple(batch["seq_lens"].tolist()) + (0,) * padding
        seen_buckets.add(bucket_of(rows))
        decoder.workload.advance(eager.argmax(-1))  # every live request's length grows by one
    assert seen_buckets == set(BUCKETS)


def test_int32_cache_locations_and_zero_fill_reach_the_model(npu):
    device, simulator = npu
    decoder = NpuDecoder(device)
    slots = {slot.name: slot for slot in decoder.runner.slots}
    assert slots["slot_mapping"].dtype == torch.int32 and slots["seq_lens"].fill == 0
    assert decoder.runner.inputs.rows.buffers["slot_mapping"].dtype == torch.int32
    assert decoder.workload.batch(3)["slot_mapping"].dtype == torch.int32  # the workload follows the conventions

    decoder.runner.run(decoder.workload.batch(MAX_BS))  # fill every row, then run fewer
    eager, graph, batch = decoder.step_both(3)
    assert decoder.runner.inputs.rows.buffers["seq_lens"][3:4].tolist() == [0]  # padded row refilled with 0
    if simulator is not None:
        assert last_replayed_lengths(simulator) == (*batch["seq_lens"].tolist(), 0)
    torch.testing.assert_close(graph, eager, rtol=2e-2, atol=2e-2)


def test_breakable_decode_on_npu_equals_eager(npu):
    decoder = NpuDecoder(npu[0], mode="breakable")
    for rows in (8, 3, 1, 6):
        eager, graph, _ = decoder.step_both(rows)
        torch.testing.assert_close(graph, eager, rtol=2e-2, atol=2e-2)
        decoder.workload.advance(eager.argmax(-1))


@pytest.mark.cpu
def test_a_replay_without_its_update_fails_loudly(simulated_npu):
    decoder = NpuDecoder(simulated_npu)
    device, batch = simulated_npu, decoder.workload.batch(2)
    graph = device.make_graph("full")
    static = {name: tensor.clone() for name, tensor in batch.items()}
    with torch.no_grad():
        decoder.step(**static)
        with device.capture_session(graph, device.graph_pool()):
            logits = decoder.step(**static)
        with pytest.raises(MissingUpdateError, match="without an update since its capture.*wait forever"):
            device.replay(graph)
        device.update(graph, {hal.SlotRole.SEQ_LENS: batch["seq_lens"].tolist()})
        device.replay(graph)
        torch.testing.assert_close(logits, decoder.step(**batch), rtol=2e-2, atol=2e-2)
        with pytest.raises(MissingUpdateError, match="since its previous replay"):
            device.replay(graph)
        # Past the plugin's own check, the simulator sees what hardware would do: the gated task never runs.
        with pytest.raises(SimulatedHangError, match="would hang"):
            graph.raw.npu_graph.replay()


@pytest.mark.cpu
def test_without_the_plugins_ordering_an_update_races_the_previous_replay(simulated_npu, monkeypatch):
    decoder = NpuDecoder(simulated_npu)
    decoder.runner.run(decoder.workload.batch(4))
    monkeypatch.setattr(graph_update, "_after_previous_replay", lambda graph, stream: None)
    with pytest.raises(UpdateRaceError, match="may not have finished"):
        decoder.runner.run(decoder.workload.batch(4))


@pytest.mark.cpu
def test_the_npu_kernel_refuses_float32_naming_the_dtypes_it_takes(simulated_npu):
    config = CONFIG
    kv_cache = PagedKVCache(config, 8, simulated_npu.torch_device, torch.float32)
    step = LlamaDecoder(config, simulated_npu.torch_device, torch.float32).decode_forward(kv_cache)
    workload = DecodeWorkload(kv_cache, 1, max_context_len=4, conventions=simulated_npu.conventions)
    with pytest.raises(TypeError, match="float16 or bfloat16; the query is torch.float32"):
        step(**workload.batch())
