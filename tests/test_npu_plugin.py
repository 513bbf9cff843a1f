"""The npu device plugin: import safety, what a torch_npu build must offer, conventions, how host-length ops are
captured and updated, and which compiled modes it refuses (on the CPU SIMULATOR, every torch_npu line).

The plugin must load where torch_npu is absent or broken and report the device unavailable; judge a build by
the API it has, not its version; state the conventions runners ask for; bracket every host-length op itself
(torch_npu's auto dispatch stays off, so nothing is bracketed twice), with outputs and workspace held for the
graph's life and lengths in the type each schema takes; refuse, naming the op and the build, an op that
cannot be updated safely on that build; check update parameters; and refuse ``full`` with Inductor.
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
from devices.npu.host_length_launches import ExplicitLaunch
from devices.npu.host_length_ops import HostLengthUpdateError
from devices.npu.runtime import UnsupportedTorchNpuError
from runners import DecodeConfig, DecodeRunner, InputSlot
from support.npu_simulator import SimulatorState
from support.npu_simulator.fixture import (  # noqa: F401 (fixtures)
    npu_profile,
    npu_simulated_on_cpu,
    npu_simulator,
    simulated_npu,
)

# --- import safety (no simulator) ---------------------------------------------------------------------------


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


# --- what a build must offer ----------------------------------------------------------------------------


@pytest.mark.cpu
def test_every_simulated_line_is_accepted_whatever_its_version_says(simulated_npu, npu_profile):
    assert runtime.torch_npu_runtime().version == npu_profile.version
    assert simulated_npu.modes[0] == "full"


@pytest.mark.cpu
@pytest.mark.parametrize(("missing", "named"), [("ExternalEvent", "torch.npu.ExternalEvent"), ("device", "torch.npu.device")])
def test_a_torch_npu_lacking_part_of_the_graph_api_is_refused_naming_what_and_the_version(npu_simulator, monkeypatch, missing, named):
    monkeypatch.delattr(torch.npu, missing)
    version = npu_simulator.profile.version
    with pytest.raises(UnsupportedTorchNpuError, match=rf"torch_npu {version} lacks {named}, which graphhal's npu device calls"):
        hal.DeviceRegistry(load_entry_points=False).get_device("npu")


@pytest.mark.cpu
def test_an_npugraph_without_capture_begin_is_refused(npu_simulator, monkeypatch):
    monkeypatch.delattr(torch.npu.NPUGraph, "capture_begin")
    with pytest.raises(UnsupportedTorchNpuError, match=r"lacks torch\.npu\.NPUGraph\.capture_begin"):
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


class DecodeStepInputs:
    """Slots and batches of a one-layer decode-attention step: query, block tables, sequence lengths."""

    HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, MAX_BLOCKS = 4, 2, 8, 16, 3  # FIA pages: blocks of 16n

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


class PagedAttentionStep(DecodeStepInputs):
    """A decode-attention step through ``torch_npu._npu_paged_attention`` (ATB): lengths as a host int32 tensor
    ``context_lens``, output ``out`` positional, no workspace passed (the plugin adds it)."""

    def __init__(self, max_rows: int) -> None:
        generator = torch.Generator().manual_seed(0)
        blocks = 1 + max_rows * self.MAX_BLOCKS
        shape = (blocks, self.BLOCK_SIZE, self.KV_HEADS, self.HEAD_DIM)
        self.key_cache = torch.randn(shape, generator=generator).to(torch.bfloat16)
        self.value_cache = torch.randn(shape, generator=generator).to(torch.bfloat16)

    def __call__(self, *, q: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        if torch.npu.is_current_stream_capturing():  # no values to read yet: placeholders the update replaces
            # Short ones, as a server's dummy batch has: ATB sizes its workspace from context_lens, so the plugin
            # must size it for the longest lengths an update may bring, not for these.
            context_lens = torch.ones(q.shape[0], dtype=torch.int32)
        else:
            context_lens = torch.tensor(seq_lens.tolist(), dtype=torch.int32)
        sys.modules["torch_npu"]._npu_paged_attention(
            q, self.key_cache, self.value_cache, self.KV_HEADS, self.HEADS, self.HEAD_DIM**-0.5, block_tables,
            context_lens, out,
        )
        return out


@pytest.mark.cpu
def test_paged_attention_is_bracketed_by_the_plugin_and_updated_with_a_tensor_and_its_workspace(simulated_npu, npu_simulator: SimulatorState):
    """On 7.2's PyTorch 2.6 cut, 7.3 and 26.0 torch_npu would bracket this op itself; the plugin keeps auto
    dispatch off and brackets it on every line, re-issuing it with ``context_lens`` as the int32 host tensor
    its schema takes and the workspace allocated at capture (the simulator refuses an update without it)."""
    step = PagedAttentionStep(max_rows=4)
    graph = simulated_npu.make_graph("full")
    if not npu_simulator.profile.paged_attention_workspace:
        with pytest.raises(HostLengthUpdateError, match=r"_npu_paged_attention.* torch_npu 2\.6\.0\b.*no workspace"):
            with simulated_npu.capture_session(graph, simulated_npu.graph_pool()):
                step(**step.batch([1, 1], seed=0))
        return
    with simulated_npu.capture_session(graph, simulated_npu.graph_pool()):
        step(**step.batch([1, 1], seed=0))
    (launch,) = graph.raw.launches
    assert isinstance(launch, ExplicitLaunch) and launch.kwargs["workspace"] is not None
    assert graph.raw.npu_graph.graph_dispatch_mode.graph_dispatch_records == []  # torch_npu bracketed nothing

    runner = DecodeRunner(step, step.slots(), simulated_npu, DecodeConfig(buckets=[1, 2, 4], show_progress=False))
    runner.capture()
    capacity = step.MAX_BLOCKS * step.BLOCK_SIZE
    for seed, lengths in enumerate([[3, 12, 0], [4, 1], [capacity, 5, 6, 7], [9], [2, 3, 4]]):
        batch = step.batch(lengths, seed)
        torch.testing.assert_close(runner.run(batch), step(**batch), rtol=0, atol=0)
        replayed = [launch for launch in npu_simulator.launches if launch.phase == "replay"][-1]
        assert replayed.lengths == tuple(lengths) + (0,) * ({1: 1, 2: 2, 3: 4, 4: 4}[len(lengths)] - len(lengths))


@pytest.mark.cpu
def test_paged_attention_on_a_build_without_its_workspace_fails_the_runners_capture_naming_op_and_build(simulated_npu, npu_simulator):
    step = PagedAttentionStep(max_rows=2)
    runner = DecodeRunner(step, step.slots(), simulated_npu, DecodeConfig(buckets=[1, 2], show_progress=False))
    if npu_simulator.profile.paged_attention_workspace:
        runner.capture()
        return
    with pytest.raises(hal.CaptureError, match=r"bucket 2.*npu") as failure:
        runner.capture()
    assert "_npu_paged_attention" in str(failure.value.__cause__) and "torch_npu 2.6.0" in str(failure.value.__cause__)


class FusedOutStep(DecodeStepInputs):
    """A decode step calling ``npu_fused_infer_attention_score.out`` itself, with its own outputs and no
    workspace (the plugin adds one, sized at capture and reused by every update)."""

    def __init__(self, max_rows: int) -> None:
        generator = torch.Generator().manual_seed(1)
        blocks = 1 + max_rows * self.MAX_BLOCKS
        shape = (blocks, self.BLOCK_SIZE, self.KV_HEADS * self.HEAD_DIM)
        self.key_cache = torch.randn(shape, generator=generator).to(torch.bfloat16)
        self.value_cache = torch.randn(shape, generator=generator).to(torch.bfloat16)

    def __call__(self, *, q: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        rows = q.shape[0]
        capacity = self.MAX_BLOCKS * self.BLOCK_SIZE
        lengths = [capacity] * rows if torch.npu.is_current_stream_capturing() else seq_lens.tolist()
        out = [torch.empty(rows, 1, self.HEADS * self.HEAD_DIM, dtype=q.dtype), torch.empty(1, dtype=q.dtype)]
        sys.modules["torch_npu"].npu_fused_infer_attention_score.out(
            q.reshape(rows, 1, -1), self.key_cache, self.value_cache, block_table=block_tables,
            actual_seq_lengths_kv=lengths, num_heads=self.HEADS, num_key_value_heads=self.KV_HEADS,
            scale=self.HEAD_DIM**-0.5, input_layout="BSH", block_size=self.BLOCK_SIZE, out=out,
        )
        return out[0].view(rows, self.HEADS, self.HEAD_DIM)


@pytest.mark.cpu
def test_a_fused_out_call_without_a_workspace_gets_one_the_graph_holds_for_every_update(simulated_npu, npu_simulator):
    step = FusedOutStep(max_rows=4)
    runner = DecodeRunner(step, step.slots(), simulated_npu, DecodeConfig(buckets=[2, 4], show_progress=False))
    runner.capture()
    for seed, lengths in enumerate([[12, 1, 0], [5, 7], [2, 3, 4, 12]]):
        batch = step.batch(lengths, seed)
        torch.testing.assert_close(runner.run(batch), step(**batch), rtol=0, atol=0)
    workspaces = [launch.kwargs["workspace"] for graph in _runner_graphs(runner) for launch in graph.launches]
    assert len(workspaces) == 2 and all(workspace is not None for workspace in workspaces)


class TwoLayerFusedStep(FusedOutStep):
    """Two fused-attention launches per step (two layers), each through ``.default``: one graph, two launches."""

    def __call__(self, *, q: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        rows = q.shape[0]
        lengths = [1] * rows if torch.npu.is_current_stream_capturing() else seq_lens.tolist()
        hidden = q
        for _ in range(2):
            out, _ = sys.modules["torch_npu"].npu_fused_infer_attention_score(
                hidden.reshape(rows, 1, -1), self.key_cache, self.value_cache, block_table=block_tables,
                actual_seq_lengths_kv=lengths, num_heads=self.HEADS, num_key_value_heads=self.KV_HEADS,
                scale=self.HEAD_DIM**-0.5, input_layout="BSH", block_size=self.BLOCK_SIZE,
            )
            hidden = out.view(rows, self.HEADS, self.HEAD_DIM) + q
        return hidden


@pytest.mark.cpu
def test_the_attention_launches_of_one_graph_share_one_workspace(simulated_npu):
    """As vllm-ascend shares one per capture size: a workspace per layer per bucket would multiply the graph
    memory by the layer count for nothing (the launches of a graph run one after another)."""
    step = TwoLayerFusedStep(max_rows=2)
    runner = DecodeRunner(step, step.slots(), simulated_npu, DecodeConfig(buckets=[1, 2], show_progress=False))
    runner.capture()
    for graph in _runner_graphs(runner):
        workspaces = {launch.kwargs["workspace"].data_ptr() for launch in graph.launches}
        assert len(graph.launches) == 2 and len(workspaces) == 1
    for seed, lengths in enumerate([[12, 1], [step.MAX_BLOCKS * step.BLOCK_SIZE], [0, 30]]):
        batch = step.batch(lengths, seed)
        torch.testing.assert_close(runner.run(batch), step(**batch), rtol=0, atol=0)


def _runner_graphs(runner: DecodeRunner) -> list:
    return [bucket.graph.raw for bucket in runner.graphs.values()]


@pytest.mark.cpu
def test_fused_attention_v2_is_bracketed_and_updated_where_the_build_has_it(simulated_npu, npu_simulator):
    torch_npu = sys.modules["torch_npu"]
    if not npu_simulator.profile.fia_v2:
        assert not hasattr(torch_npu, "npu_fused_infer_attention_score_v2")  # op-plugin 480bc431 (7.1) has none
        return
    step = FusedOutStep(max_rows=2)
    q = torch.randn(2, step.HEADS, step.HEAD_DIM).to(torch.bfloat16)
    block_tables = torch.arange(1, 7, dtype=torch.int32).view(2, 3)

    def attention(lengths: list[int]) -> torch.Tensor:
        out, _ = torch_npu.npu_fused_infer_attention_score_v2(
            q.reshape(2, 1, -1), step.key_cache, step.value_cache, block_table=block_tables, actual_seq_kvlen=lengths,
            num_query_heads=step.HEADS, num_key_value_heads=step.KV_HEADS, softmax_scale=step.HEAD_DIM**-0.5,
            input_layout="BSH", block_size=step.BLOCK_SIZE,
        )
        return out

    graph = simulated_npu.make_graph("full")
    with simulated_npu.capture_session(graph, simulated_npu.graph_pool()):
        captured = attention([12, 12])
    assert graph.raw.launches[0].func._overloadname == "out"  # .default swapped, outputs preallocated
    simulated_npu.update(graph, {"seq_lens": [7, 0]})
    simulated_npu.replay(graph)
    torch.testing.assert_close(captured, attention([7, 0]), rtol=0, atol=0)


@pytest.mark.cpu
def test_capturing_neither_empties_the_caches_nor_collects_garbage(simulated_npu, npu_simulator: SimulatorState):
    step = FusedOutStep(max_rows=4)
    DecodeRunner(step, step.slots(), simulated_npu, DecodeConfig(buckets=[1, 2, 4], show_progress=False)).capture()
    assert npu_simulator.cache_flushes == 0 and npu_simulator.gc_collects == 0  # torch.npu.graph would do both


@pytest.mark.cpu
def test_the_plugins_capture_mode_is_an_infra_mode_so_compiled_code_keeps_running_compiled(simulated_npu):
    calls = []

    def counting_backend(gm, example_inputs):  # type: ignore[no-untyped-def]
        def run(*args):  # type: ignore[no-untyped-def]
            calls.append(1)
            return gm(*args)

        return run

    torch._dynamo.reset()
    compiled = torch.compile(lambda x: x * 2 + 1, backend=counting_backend)
    x = torch.ones(4)
    compiled(x)
    graph = simulated_npu.make_graph("full")
    with simulated_npu.capture_session(graph, simulated_npu.graph_pool()):
        y = compiled(x)  # a non-infra mode here would make Dynamo skip the frame (and keep skipping it)
    compiled(x)
    assert len(calls) == 3
    simulated_npu.replay(graph)
    assert y.tolist() == [3.0] * 4


@pytest.mark.cpu
def test_updates_and_torch_npus_own_streams_live_on_the_graphs_device(npu_profile):
    with npu_simulated_on_cpu(npu_profile, device_count=2) as simulator:
        device = hal.DeviceRegistry(load_entry_points=False).get_device("npu:1")
        step = FusedOutStep(max_rows=2)
        runner = DecodeRunner(step, step.slots(), device, DecodeConfig(buckets=[2], show_progress=False))
        runner.capture()
        runner.run(step.batch([3, 4], seed=0))
        assert runtime.torch_npu_runtime().update_stream(1).device_index == 1
        # torch_npu makes an update stream at NPUGraph() on the current device (one per graph on 7.1/7.2, one
        # per process from 7.3): the plugin builds the graph with npu:1 current, while npu:0 stays current here
        (npu_graph,) = [graph.npu_graph for graph in _runner_graphs(runner)]
        assert npu_graph.graph_dispatch_mode.update_stream.device_index == 1
        assert simulator.current_device == 0


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
    step = FusedOutStep(max_rows=2)
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


# --- compiled forwards -------------------------------------------------------------------------------------


@pytest.mark.cpu
def test_full_graphs_of_an_inductor_compiled_forward_are_refused_naming_npu_the_mode_and_why(simulated_npu):
    with pytest.raises(
        hal.UnsupportedModeError,
        match=r"decode: device npu cannot capture mode 'full' with compiler 'inductor': npu attention takes "
        r"per-request lengths as host values.*opaque op whose kernel no dispatch mode sees",
    ):
        DecodeConfig(mode="full", compiler="inductor").check_device(simulated_npu)
    step = FusedOutStep(max_rows=2)
    with pytest.raises(hal.UnsupportedModeError, match="cannot capture mode 'full' with compiler 'inductor'"):
        DecodeRunner(step, step.slots(), simulated_npu, DecodeConfig(mode="full", compiler="inductor"))


@pytest.mark.cpu
@pytest.mark.parametrize(("mode", "compiler"), [("full", "none"), ("breakable", "inductor"), ("piecewise", "inductor"), ("piecewise", "eager")])
def test_modes_that_keep_attention_outside_compiled_graphs_stay_allowed(simulated_npu, mode, compiler):
    DecodeConfig(mode=mode, compiler=compiler).check_device(simulated_npu)
