"""The npu device plugin: import safety, torch_npu versions, conventions, updates (on the CPU SIMULATOR).

The plugin must load where torch_npu is absent or broken and report the device unavailable; refuse a
torch_npu older than it supports, naming both versions; state the conventions runners ask for; check update
parameters; and update launches torch_npu has no handler for through explicit task groups.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

import devices.npu
import hal
from devices.npu import runtime
from devices.npu.host_length_launches import ExplicitLaunch, HostLengthUpdateError
from devices.npu.runtime import TorchNpuVersionError, check_version
from runners import DecodeConfig, DecodeRunner, InputSlot
from support.npu_simulator import SimulatorState
from support.npu_simulator.fixture import npu_simulated_on_cpu, npu_simulator, simulated_npu  # noqa: F401 (fixtures)

# --- import safety and versions (no simulator) ----------------------------------------------------------


def test_without_torch_npu_the_plugin_loads_and_the_npu_is_unavailable():
    assert runtime.find_torch_npu() == (None, "torch_npu is not installed")
    registry = hal.DeviceRegistry(load_entry_points=False)
    assert registry.broken == {} and registry.device_types()["npu"] == "devices.npu"
    assert not registry.is_available("npu")
    with pytest.raises(hal.DeviceUnavailableError, match="npu.*not available"):
        registry.get_device("npu")


def test_a_torch_npu_that_raises_on_import_leaves_the_plugin_loaded_and_the_npu_unavailable(tmp_path: Path, monkeypatch):
    package = tmp_path / "torch_npu"
    package.mkdir()
    (package / "__init__.py").write_text(
        'raise ImportError("libhccl.so: cannot open shared object file: No such file or directory")\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(runtime, "_failed_imports", {})
    # A fresh import of the plugin package: importing it must not touch torch_npu at all.
    monkeypatch.setattr(devices, "npu", devices.npu)  # restored afterwards, with sys.modules
    monkeypatch.delitem(sys.modules, "devices.npu")
    plugin = importlib.import_module("devices.npu")
    assert "torch_npu" not in sys.modules

    registry = hal.DeviceRegistry(["devices.cpu", "devices.cuda"], load_entry_points=False)
    registry.register(plugin, "devices.npu", "built-in")
    assert registry.broken == {} and not registry.is_available("npu")
    module, reason = runtime.find_torch_npu()
    assert module is None and "fails to import: ImportError: libhccl.so" in reason
    assert "torch_npu" not in sys.modules


@pytest.mark.parametrize("version", ["2.6.0", "2.6.0.post3", "2.7.1rc1", "2.14.0", "3.0.0"])
def test_torch_npu_2_6_and_newer_are_supported(version):
    check_version(version)


@pytest.mark.parametrize(
    ("version", "message"),
    [
        ("2.5.1", r"torch_npu 2\.5\.1 is too old: graphhal's npu device needs torch_npu >= 2\.6"),
        ("2.1.0.post10", r"torch_npu 2\.1\.0\.post10 is too old.*>= 2\.6"),
        ("unknown", r"version 'unknown', which graphhal cannot read.*>= 2\.6"),
    ],
)
def test_older_or_unreadable_torch_npu_versions_are_refused_naming_the_version_and_the_minimum(version, message):
    with pytest.raises(TorchNpuVersionError, match=message):
        check_version(version)


@pytest.mark.cpu
def test_an_old_torch_npu_is_refused_when_the_device_is_asked_for():
    with npu_simulated_on_cpu(version="2.5.1"):
        registry = hal.DeviceRegistry(load_entry_points=False)
        assert registry.is_available("npu")  # the card is there; graphhal cannot drive it
        with pytest.raises(TorchNpuVersionError, match=r"torch_npu 2\.5\.1 is too old.*>= 2\.6"):
            registry.get_device("npu")


@pytest.mark.cpu
def test_a_torch_npu_lacking_part_of_the_graph_api_is_refused_naming_what_is_missing(npu_simulator, monkeypatch):
    monkeypatch.delattr(torch.npu, "ExternalEvent")
    with pytest.raises(TorchNpuVersionError, match=r"torch_npu 2\.14\.0 lacks torch\.npu\.ExternalEvent"):
        hal.DeviceRegistry(load_entry_points=False).get_device("npu")


# --- the device on the simulator -------------------------------------------------------------------------


@pytest.mark.cpu
def test_the_npu_device_states_its_conventions_and_how_its_graphs_behave(simulated_npu):
    assert simulated_npu.conventions == hal.DeviceConventions(
        cache_location_dtype=torch.int32, seq_len_dtype=torch.int32, seq_len_fill=0
    )
    assert simulated_npu.needs_graph_update and not simulated_npu.capture_executes_work
    assert "full" in simulated_npu.modes and "breakable" in simulated_npu.modes
    assert simulated_npu.torch_device == torch.device("cpu")  # the simulator's placement; npu:0 on hardware


class PagedAttentionStep:
    """A decode-attention step through ``torch_npu._npu_paged_attention``, for which torch_npu has no capture
    handler: the plugin must bracket it in a task group itself. Lengths go in as a host int32 tensor."""

    HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, MAX_BLOCKS = 4, 2, 8, 4, 3

    def __init__(self, device: torch.device, max_rows: int) -> None:
        generator = torch.Generator().manual_seed(0)
        blocks = 1 + max_rows * self.MAX_BLOCKS
        shape = (blocks, self.BLOCK_SIZE, self.KV_HEADS, self.HEAD_DIM)
        self.key_cache = torch.randn(shape, generator=generator).to(device, torch.bfloat16)
        self.value_cache = torch.randn(shape, generator=generator).to(device, torch.bfloat16)

    def slots(self) -> list[InputSlot]:
        return [
            InputSlot("q", torch.bfloat16, (self.HEADS, self.HEAD_DIM)),
            InputSlot("block_tables", torch.int32, (self.MAX_BLOCKS,), fill=0),
            InputSlot("seq_lens", torch.int32, fill=0, role=hal.SlotRole.SEQ_LENS),
        ]

    def batch(self, lengths: list[int], seed: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        rows = len(lengths)
        return {
            "q": torch.randn(rows, self.HEADS, self.HEAD_DIM, generator=generator).to(torch.bfloat16),
            "block_tables": torch.arange(1, 1 + rows * self.MAX_BLOCKS, dtype=torch.int32).view(rows, self.MAX_BLOCKS),
            "seq_lens": torch.tensor(lengths, dtype=torch.int32),
        }

    def __call__(self, *, q: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        if torch.npu.is_current_stream_capturing():  # no values to read yet: placeholders the update replaces
            context_lens = torch.full((q.shape[0],), self.MAX_BLOCKS * self.BLOCK_SIZE, dtype=torch.int32)
        else:
            context_lens = torch.tensor(seq_lens.tolist(), dtype=torch.int32)
        sys.modules["torch_npu"]._npu_paged_attention(
            q, self.key_cache, self.value_cache, self.KV_HEADS, self.HEADS, self.HEAD_DIM**-0.5, block_tables,
            context_lens, out=out,
        )
        return out


@pytest.mark.cpu
def test_an_op_without_a_torch_npu_handler_is_updated_through_explicit_task_groups(simulated_npu, npu_simulator: SimulatorState):
    step = PagedAttentionStep(simulated_npu.torch_device, max_rows=4)
    graph = simulated_npu.make_graph("full")
    with simulated_npu.capture_session(graph, simulated_npu.graph_pool()):
        step(**step.batch([1, 1], seed=0))
    assert [type(launch) for launch in graph.raw.launches] == [ExplicitLaunch]

    runner = DecodeRunner(step, step.slots(), simulated_npu, DecodeConfig(buckets=[1, 2, 4], show_progress=False))
    runner.capture()
    capacity = step.MAX_BLOCKS * step.BLOCK_SIZE
    for seed, lengths in enumerate([[3, 12, 0], [4, 1], [capacity, 5, 6, 7], [9], [2, 3, 4]]):
        batch = step.batch(lengths, seed)
        torch.testing.assert_close(runner.run(batch), step(**batch), rtol=0, atol=0)
        replayed = [launch for launch in npu_simulator.launches if launch.phase == "replay"][-1]
        assert replayed.lengths == tuple(lengths) + (0,) * ({1: 1, 2: 2, 3: 4, 4: 4}[len(lengths)] - len(lengths))


@pytest.mark.cpu
def test_capturing_does_not_empty_the_caches(simulated_npu, npu_simulator: SimulatorState):
    step = PagedAttentionStep(simulated_npu.torch_device, max_rows=4)
    DecodeRunner(step, step.slots(), simulated_npu, DecodeConfig(buckets=[1, 2, 4], show_progress=False)).capture()
    assert npu_simulator.cache_flushes == 0  # torch.npu.graph would empty both caches on every capture


@pytest.mark.cpu
@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"seq_lens": [1, 2, 3]}, r"has 3 lengths but this npu graph was captured for 2 requests; pad"),
        ({"seq_lens": torch.tensor([1, 2], dtype=torch.int32)}, r"must be a host list of ints, got Tensor"),
        ({"seq_lens": [1, -2]}, r"must hold non-negative ints, got -2"),
        ({"seq_lens": [1, 2], "block_tables": [0]}, r"no update parameter\(s\) 'block_tables'; supported: seq_lens"),
        ({}, r"the update must give 'seq_lens' \(2 ints, padded with 0\)"),
    ],
)
def test_update_parameters_are_checked_with_the_reason(simulated_npu, params, message):
    step = PagedAttentionStep(simulated_npu.torch_device, max_rows=2)
    graph = simulated_npu.make_graph("full")
    with simulated_npu.capture_session(graph, None):
        step(**step.batch([1, 1], seed=0))
    with pytest.raises(HostLengthUpdateError, match=message):
        simulated_npu.update(graph, params)


@pytest.mark.cpu
def test_a_graph_without_host_length_launches_takes_an_update_as_a_no_op(simulated_npu):
    x = torch.ones(4)
    graph = simulated_npu.make_graph("full")
    with simulated_npu.capture_session(graph, None):
        y = x * 2
    simulated_npu.update(graph, {"seq_lens": [5, 0]})  # e.g. a breakable graph's segment between attentions
    simulated_npu.replay(graph)
    assert y.tolist() == [2.0] * 4


@pytest.mark.cpu
def test_a_failing_capture_is_dropped_and_the_device_captures_again(simulated_npu):
    x = torch.ones(4)
    graph = simulated_npu.make_graph("full")
    with pytest.raises(RuntimeError, match="the model failed"):
        with simulated_npu.capture_session(graph, None):
            x * 2
            raise RuntimeError("the model failed")
    assert not graph.raw.captured and not torch.npu.is_current_stream_capturing()
    with pytest.raises(RuntimeError, match="never captured"):
        simulated_npu.replay(graph)
    graph = simulated_npu.make_graph("full")
    with simulated_npu.capture_session(graph, None):
        y = x + 1
    simulated_npu.replay(graph)
    assert y.tolist() == [2.0] * 4
