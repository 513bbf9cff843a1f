"""The CPU SIMULATOR of torch_npu's graph API (tests/support/npu_simulator), through torch_npu's own calls,
on every simulated release line.

The first part pins what the simulator models on every line, so that the npu plugin's tests prove something:
host lengths are baked into a capture, task groups and updates change them, and each way to get the order
wrong on hardware (a missing update, an update not ordered before the replay, an update racing the previous
replay, a host read inside a capture, a launch hidden from the capture, an updatable launch without a
workspace) is reported instead of silently accepted. The second part pins how torch_npu's own
``auto_dispatch_capture`` behaves per line, as its source reads (issue 16): these are the behaviours the npu
plugin avoids by bracketing every op itself.
"""

from __future__ import annotations

import sys

import pytest
import torch

from graphhal.paged_attention import decode_attention_reference
from graphhal.paged_attention.prefill_attention_reference import prefill_attention_reference
from support.npu_simulator import (
    DanglingRecordError,
    HiddenLaunchError,
    HostReadDuringCaptureError,
    MissingWorkspaceError,
    SimulatedHangError,
    SimulatorError,
    StaleHostValuesError,
    UpdateRaceError,
    installed,
)
from support.npu_simulator.capture import DeviceQueue
from support.npu_simulator.fixture import PROFILE_PARAMS, npu_profile  # noqa: F401 (fixture)

pytestmark = pytest.mark.cpu

BATCH, HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, MAX_BLOCKS = 3, 4, 2, 8, 16, 3  # FIA pages: blocks of 16n
CAPACITY = MAX_BLOCKS * BLOCK_SIZE


@pytest.fixture
def torch_npu(npu_profile):
    """The simulated torch_npu module of each profile in turn (tensors stay on the CPU)."""
    with installed(npu_profile) as simulator:
        module = sys.modules["torch_npu"]
        module.simulator = simulator
        yield module


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

    def fused_arguments(self, lengths: list[int]) -> tuple[tuple, dict]:
        blocks = self.key_cache.shape[0]
        args = (
            self.q.reshape(BATCH, 1, HEADS * HEAD_DIM),
            self.key_cache.view(blocks, BLOCK_SIZE, KV_HEADS * HEAD_DIM),
            self.value_cache.view(blocks, BLOCK_SIZE, KV_HEADS * HEAD_DIM),
        )
        kwargs = dict(
            block_table=self.block_tables, actual_seq_lengths_kv=lengths, num_heads=HEADS, num_key_value_heads=KV_HEADS,
            scale=self.scale, input_layout="BSH", block_size=BLOCK_SIZE,
        )
        return args, kwargs

    def fused(self, torch_npu, lengths: list[int]) -> torch.Tensor:
        """torch_npu.npu_fused_infer_attention_score over the case, as [batch, heads, head_dim]."""
        args, kwargs = self.fused_arguments(lengths)
        out, _ = torch_npu.npu_fused_infer_attention_score(*args, **kwargs)
        return out.view(BATCH, HEADS, HEAD_DIM)

    def fused_out(self, torch_npu, lengths: list[int], workspace, out: list[torch.Tensor]) -> None:
        """The ``.out`` overload with a workspace, writing ``out`` ([B, 1, N*D] and a one-element lse)."""
        args, kwargs = self.fused_arguments(lengths)
        torch_npu.npu_fused_infer_attention_score.out(*args, **kwargs, workspace=workspace, out=out)

    def fused_workspace(self, torch_npu, lengths: list[int]) -> torch.Tensor:
        args, kwargs = self.fused_arguments(lengths)
        return torch_npu._npu_fused_infer_attention_score_get_max_workspace(*args, **kwargs)

    def paged(self, torch_npu, context_lens: torch.Tensor, workspace=None) -> None:
        """torch_npu._npu_paged_attention into ``self.out`` (a workspace only where the build takes one)."""
        extra = {} if workspace is None else {"workspace": workspace}
        torch_npu._npu_paged_attention(
            self.q, self.key_cache, self.value_cache, KV_HEADS, HEADS, self.scale, self.block_tables, context_lens,
            self.out, **extra,
        )

    def paged_workspace(self, torch_npu, context_lens: torch.Tensor) -> torch.Tensor:
        return torch_npu._npu_paged_attention_get_workspace(
            self.q, self.key_cache, self.value_cache, KV_HEADS, HEADS, self.scale, self.block_tables, context_lens,
            self.out,
        )

    def reference(self, lengths: list[int]) -> torch.Tensor:
        seq_lens = torch.tensor(lengths, dtype=torch.int32)
        return decode_attention_reference(self.q, self.key_cache, self.value_cache, self.block_tables, seq_lens, self.scale)


class GatedFusedAttention:
    """A graph holding one fused-attention launch in a task group gated by an ExternalEvent, the way the npu
    plugin and vllm-ascend bracket it: ``.out`` with a workspace sized by the largest lengths."""

    def __init__(self, torch_npu, case: AttentionCase) -> None:
        npu = torch_npu.npu
        self.torch_npu, self.case = torch_npu, case
        self.graph = npu.NPUGraph()
        with npu.graph(self.graph):
            stream = npu.current_stream()
            self.workspace = case.fused_workspace(torch_npu, [CAPACITY] * BATCH)
            self.out = [torch.empty(BATCH, 1, HEADS * HEAD_DIM, dtype=case.q.dtype), torch.empty(1, dtype=case.q.dtype)]
            self.event = npu.ExternalEvent()
            self.event.wait(stream)
            self.event.reset(stream)
            npu.graph_task_group_begin(stream)
            case.fused_out(torch_npu, [CAPACITY] * BATCH, self.workspace, self.out)
            self.handle = npu.graph_task_group_end(stream)

    def update(self, stream, lengths: list[int], record_event_first: bool = False) -> None:
        npu = self.torch_npu.npu
        with npu.stream(stream):
            if record_event_first:
                self.event.record(stream)  # releases the gated task before the update below lands
            npu.graph_task_update_begin(stream, self.handle)
            self.case.fused_out(self.torch_npu, lengths, self.workspace, self.out)
            npu.graph_task_update_end(stream)
            if not record_event_first:
                self.event.record(stream)

    @property
    def result(self) -> torch.Tensor:
        return self.out[0].view(BATCH, HEADS, HEAD_DIM)


# --- kernels --------------------------------------------------------------------------------------------


def test_fused_attention_equals_the_reference_and_empty_rows_are_zero(torch_npu):
    case = AttentionCase()
    lengths = [5, 0, CAPACITY]
    torch.testing.assert_close(case.fused(torch_npu, lengths), case.reference(lengths), rtol=2e-2, atol=2e-2)
    assert case.fused(torch_npu, lengths)[1].abs().sum() == 0


def test_fused_attention_takes_float16_or_bfloat16_only(torch_npu):
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        AttentionCase(dtype=torch.float32).fused(torch_npu, [1, 1, 1])


def test_each_line_offers_the_ops_and_schemas_of_its_op_plugin(torch_npu):
    profile = torch_npu.simulator.profile
    paged = torch_npu._npu_paged_attention.default._schema
    assert [a.name for a in paged.arguments][7:9] == ["context_lens", "out"]  # positional, as op-plugin defines them
    assert ("workspace" in [a.name for a in paged.arguments if a.kwarg_only]) is profile.paged_attention_workspace
    assert hasattr(torch_npu, "_npu_paged_attention_get_workspace") is profile.paged_attention_workspace
    assert hasattr(torch_npu, "npu_fused_infer_attention_score_v2") is profile.fia_v2
    assert hasattr(torch_npu, "_npu_fused_infer_attention_score_infer_output") is profile.infer_output
    fused_out = torch_npu.npu_fused_infer_attention_score.out._schema
    assert not fused_out.is_mutable  # torch_npu's codegen drops the alias annotations (Tensor[] out)
    assert fused_out.arguments[-1].name == "out" and fused_out.arguments[-2].name == "workspace"
    assert ("_npugraph_handlers" in dir(torch_npu.npu)) is profile.has_handler_registry


def test_fias_max_workspace_covers_every_length_its_block_table_allows(torch_npu):
    """FIA's helper asks CANN for the call's MAX workspace: asked with short lengths, it still serves the longest
    the block tables allow (what an update may bring)."""
    case = AttentionCase()
    workspace = case.fused_workspace(torch_npu, [1, 1, 1])
    out = [torch.empty(BATCH, 1, HEADS * HEAD_DIM, dtype=case.q.dtype), torch.empty(1, dtype=case.q.dtype)]
    case.fused_out(torch_npu, [CAPACITY] * BATCH, workspace, out)
    torch.testing.assert_close(out[0].view(BATCH, HEADS, HEAD_DIM), case.reference([CAPACITY] * BATCH), rtol=2e-2, atol=2e-2)


def test_a_paged_attention_workspace_sized_for_shorter_lengths_is_refused(torch_npu):
    """ATB sizes the paged attention workspace from the context_lens it is given: too small for longer ones (on
    hardware silently; the simulator raises)."""
    if not torch_npu.simulator.profile.paged_attention_workspace:
        pytest.skip("op-plugin 480bc431 (torch_npu 7.1) has no paged attention workspace")
    case = AttentionCase()
    workspace = case.paged_workspace(torch_npu, torch.tensor([1, 1, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="workspace holds .* bytes but these lengths need"):
        case.paged(torch_npu, torch.tensor([CAPACITY, 1, 1], dtype=torch.int32), workspace)


class PackedCase:
    """Random packed-prefill ("TND") inputs over a paged cache: two requests (4 new tokens; 5 new after 15
    cached), then a token tail owning the last row, as refmodel's npu prefill kernel calls the op."""

    HEAD_DIM, BLOCK_SIZE, TOKENS = 128, 16, 10

    def __init__(self, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        shape = (8, self.BLOCK_SIZE, KV_HEADS, self.HEAD_DIM)
        self.key_cache = torch.randn(shape, generator=generator).to(torch.bfloat16)
        self.value_cache = torch.randn(shape, generator=generator).to(torch.bfloat16)
        self.q = torch.randn(self.TOKENS, HEADS, self.HEAD_DIM, generator=generator).to(torch.bfloat16)
        self.block_tables = torch.tensor([[1, 2], [3, 4], [0, 0]], dtype=torch.int32)
        self.mask = torch.triu(torch.ones(2048, 2048), diagonal=1).to(torch.int8)

    def kwargs(self, **changes) -> dict:
        kwargs = dict(
            atten_mask=self.mask, actual_seq_lengths=[4, 9, 10], actual_seq_lengths_kv=[4, 20, 1],
            block_table=self.block_tables, num_heads=HEADS, num_key_value_heads=KV_HEADS, scale=self.HEAD_DIM**-0.5,
            input_layout="TND", sparse_mode=3, block_size=self.BLOCK_SIZE,
        )
        return {**kwargs, **changes}

    def fused(self, torch_npu, q=None, **changes) -> torch.Tensor:
        blocks = self.key_cache.shape[0]
        out, _ = torch_npu.npu_fused_infer_attention_score(
            self.q if q is None else q,
            self.key_cache.view(blocks, self.BLOCK_SIZE, -1),
            self.value_cache.view(blocks, self.BLOCK_SIZE, -1),
            **self.kwargs(**changes),
        )
        return out


def needs_tnd_pages(torch_npu) -> None:
    profile = torch_npu.simulator.profile
    if not profile.fia_tnd_page_attention:
        pytest.skip(f"op-plugin {profile.op_plugin} (torch_npu {profile.name}) documents no page attention in TND")


def test_lines_before_7_3_refuse_page_attention_in_tnd_as_their_op_plugin_documents(torch_npu):
    profile = torch_npu.simulator.profile
    if profile.fia_tnd_page_attention:
        PackedCase().fused(torch_npu)
        return
    with pytest.raises(ValueError, match=f"torch_npu {profile.name} .*documents no page attention .*in layout TND"):
        PackedCase().fused(torch_npu)


def test_packed_prefill_is_causal_from_each_requests_context_as_the_reference(torch_npu):
    needs_tnd_pages(torch_npu)
    case = PackedCase()
    out = case.fused(torch_npu)
    query_lens, seq_lens = torch.tensor([4, 5], dtype=torch.int32), torch.tensor([4, 20], dtype=torch.int32)
    expected = prefill_attention_reference(
        case.q, case.key_cache, case.value_cache, case.block_tables[:2], query_lens, seq_lens, case.HEAD_DIM**-0.5
    )
    torch.testing.assert_close(out[:9], expected[:9], rtol=2e-2, atol=2e-2)
    launch = torch_npu.simulator.launches[-1]
    assert (launch.query_ends, launch.lengths) == ((4, 9, 10), (4, 20, 1))
    # A request with no query tokens repeats the previous end (documented as valid) and changes nothing else.
    block_tables = torch.tensor([[1, 2], [0, 0], [3, 4], [0, 0]], dtype=torch.int32)
    with_empty = case.fused(
        torch_npu, actual_seq_lengths=[4, 4, 9, 10], actual_seq_lengths_kv=[4, 0, 20, 1], block_table=block_tables
    )
    torch.testing.assert_close(with_empty, out, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"actual_seq_lengths": None}, ValueError, "needs the cumulative query lengths"),
        ({"actual_seq_lengths": [4, 3, 10]}, ValueError, "must not decrease"),
        ({"actual_seq_lengths": [4, 9, 9]}, ValueError, "end at 9 but the query has T = 10 rows"),
        ({"actual_seq_lengths_kv": [4, 20]}, ValueError, "2 KV lengths for a batch of 3"),
        ({"actual_seq_lengths_kv": [4, 33, 1]}, ValueError, r"KV length 33 outside 0\.\.32"),
        ({"sparse_mode": 3, "atten_mask": None}, ValueError, "needs the optimized atten_mask"),
        ({"atten_mask": torch.ones(16, 16, dtype=torch.int8).triu(1)}, ValueError, r"a \(2048, 2048\) atten_mask"),
        ({"atten_mask": torch.ones(2048, 2048, dtype=torch.int8).tril()}, ValueError, "the triangular mask"),
        ({"sparse_mode": 2}, NotImplementedError, "sparse_mode 2 is not simulated"),
        ({"block_table": torch.zeros(2, 2, dtype=torch.int32)}, ValueError, "block_table has 2 rows for a batch of 3"),
    ],
)
def test_packed_prefill_checks_its_arguments_as_torch_npu_documents_them(torch_npu, changes, error, message):
    needs_tnd_pages(torch_npu)
    with pytest.raises(error, match=message):
        PackedCase().fused(torch_npu, **changes)


def test_packed_prefill_takes_a_head_dim_of_128_or_192_and_a_contiguous_query(torch_npu):
    needs_tnd_pages(torch_npu)
    case = PackedCase()
    with pytest.raises(ValueError, match="head dim of 128 or 192 in TND without rope, got 64"):
        case.fused(torch_npu, q=case.q[..., :64].contiguous())
    with pytest.raises(ValueError, match="must be contiguous"):
        case.fused(torch_npu, q=case.q.transpose(0, 1).contiguous().transpose(0, 1))


# --- capture and update, as the npu plugin drives them --------------------------------------------------


def test_lengths_captured_outside_a_task_group_are_baked_in_and_replaying_them_is_stale(torch_npu):
    case = AttentionCase()
    graph = torch_npu.npu.NPUGraph()
    with torch_npu.npu.graph(graph):  # nothing brackets the launch
        case.fused(torch_npu, [4, 4, 4])
    with pytest.raises(StaleHostValuesError, match=r"baked at capture.*no update can ever change them"):
        graph.replay()


def test_explicit_task_group_update_gives_the_replay_new_lengths(torch_npu):
    case = AttentionCase()
    gated = GatedFusedAttention(torch_npu, case)
    assert torch.isnan(gated.out[0]).all()  # captured work has not run: no values before the first replay
    update_stream = torch_npu.npu.Stream()
    replayed = torch_npu.npu.Event()
    for step, lengths in enumerate(([5, 2, 9], [6, 0, CAPACITY], [7, 4, 11])):
        if step:
            update_stream.wait_event(replayed)  # the update starts after the previous replay finished
        gated.update(update_stream, lengths)
        gated.graph.replay()
        replayed.record(torch_npu.npu.current_stream())
        torch.testing.assert_close(gated.result, case.fused(torch_npu, lengths), rtol=0, atol=0)


def test_a_gated_task_replayed_without_an_update_is_a_simulated_hang(torch_npu):
    gated = GatedFusedAttention(torch_npu, AttentionCase())
    with pytest.raises(SimulatedHangError, match="would hang"):
        gated.graph.replay()  # never updated
    gated.update(torch_npu.npu.Stream(), [1, 2, 3])
    gated.graph.replay()
    torch_npu.npu.synchronize()
    with pytest.raises(SimulatedHangError, match="no update recorded since the previous replay"):
        gated.graph.replay()  # the update was consumed by the previous replay


def test_an_event_recorded_before_the_update_lets_the_replay_read_stale_lengths(torch_npu):
    gated = GatedFusedAttention(torch_npu, AttentionCase())
    gated.update(torch_npu.npu.Stream(), [5, 2, 9], record_event_first=True)
    with pytest.raises(StaleHostValuesError, match="is not ordered before it"):
        gated.graph.replay()


def test_an_update_racing_the_previous_replay_is_caught(torch_npu):
    gated = GatedFusedAttention(torch_npu, AttentionCase())
    update_stream = torch_npu.npu.Stream()
    gated.update(update_stream, [5, 2, 9])
    gated.graph.replay()
    with pytest.raises(UpdateRaceError, match=r"replay 1 of graph .* may not have finished"):
        gated.update(update_stream, [6, 3, 10])


def test_an_update_may_change_host_arguments_only(torch_npu):
    case = AttentionCase()
    gated = GatedFusedAttention(torch_npu, case)
    captured_query = case.q  # kept alive: the captured task reads its memory
    case.q = captured_query.clone()  # a different tensor than the captured launch reads
    with pytest.raises(SimulatorError, match="changed .*argument 'query': only its host arguments"):
        gated.update(torch_npu.npu.Stream(), [1, 1, 1])


def test_an_updatable_launch_without_a_workspace_is_refused_at_capture(torch_npu):
    case = AttentionCase()
    npu = torch_npu.npu
    lengths = torch.full((BATCH,), CAPACITY, dtype=torch.int32)
    stream = npu.Stream()
    with npu.stream(stream):
        npu.NPUGraph().capture_begin()
        npu.graph_task_group_begin(stream)
        with pytest.raises(MissingWorkspaceError, match="_npu_paged_attention.*without a workspace.*freed memory"):
            case.paged(torch_npu, lengths)  # no workspace (7.1: the op takes none at all)


def test_paged_attention_updates_with_its_workspace_where_the_build_takes_one(torch_npu):
    case = AttentionCase()
    npu = torch_npu.npu
    if not torch_npu.simulator.profile.paged_attention_workspace:
        assert not hasattr(torch_npu, "_npu_paged_attention_get_workspace")  # 7.1: nothing to pass
        return
    captured = torch.full((BATCH,), CAPACITY, dtype=torch.int32)
    graph = npu.NPUGraph()
    with npu.graph(graph):
        stream = npu.current_stream()
        workspace = case.paged_workspace(torch_npu, captured)
        event = npu.ExternalEvent()
        event.wait(stream)
        event.reset(stream)
        npu.graph_task_group_begin(stream)
        case.paged(torch_npu, captured, workspace)
        handle = npu.graph_task_group_end(stream)
    update_stream = npu.Stream()
    with npu.stream(update_stream):
        npu.graph_task_update_begin(update_stream, handle)
        with pytest.raises(MissingWorkspaceError, match="re-issued to update"):
            case.paged(torch_npu, torch.tensor([5, 2, 9], dtype=torch.int32))
        case.paged(torch_npu, torch.tensor([5, 2, 9], dtype=torch.int32), workspace)
        npu.graph_task_update_end(update_stream)
        event.record(update_stream)
    graph.replay()
    torch.testing.assert_close(case.out, case.fused(torch_npu, [5, 2, 9]), rtol=0, atol=0)


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
        with torch_npu.npu.graph(graph):
            wrapped_attention(case.q, case.key_cache, case.value_cache, case.block_tables, case.out)


def test_graph_arguments_in_cudas_positional_order_are_refused(torch_npu):
    graph = torch_npu.npu.NPUGraph()
    with pytest.raises(TypeError, match="auto_dispatch_capture must be a bool.*pass them by keyword"):
        torch_npu.npu.graph(graph, None, None, "thread_local")


# --- torch_npu's own auto_dispatch_capture, per line -----------------------------------------------------


def capture_fused_out_with_auto_dispatch(torch_npu, case: AttentionCase):
    """A graph captured with torch_npu's auto dispatch around ``npu_fused_infer_attention_score.out``, the one
    overload every line handles (7.1 included, graphs.py L159). Returns (graph, out)."""
    graph = torch_npu.npu.NPUGraph()
    with torch_npu.npu.graph(graph, auto_dispatch_capture=True):
        workspace = case.fused_workspace(torch_npu, [CAPACITY] * BATCH)
        out = [torch.empty(BATCH, 1, HEADS * HEAD_DIM, dtype=case.q.dtype), torch.empty(1, dtype=case.q.dtype)]
        case.fused_out(torch_npu, [CAPACITY] * BATCH, workspace, out)
    return graph, out


def test_torch_npus_auto_dispatch_of_the_fused_op_records_nothing_on_7_1_and_its_update_is_silent(torch_npu):
    """torch_npu 7.1 matches the op name ``npu_fused_infer_attention_score`` (graphs.py L138), which an
    OpOverload never is: the ``.default`` call passes through, and ``NPUGraph.update`` updates zero records
    without a word. Every other line records it and updates it."""
    case = AttentionCase()
    graph = torch_npu.npu.NPUGraph()
    with torch_npu.npu.graph(graph, auto_dispatch_capture=True):
        captured = case.fused(torch_npu, [CAPACITY] * BATCH)
    records = graph.graph_dispatch_mode.graph_dispatch_records
    graph.update(cpu_update_input=[{"actual_seq_lengths_kv": [3, 7, 0]}])  # raises on no line
    if torch_npu.simulator.profile.name == "7.1":
        assert records == []
        with pytest.raises(StaleHostValuesError, match="in no task group"):
            graph.replay()  # on hardware: every replay attends over the capture's lengths
        return
    assert [record.op_cache_entry.__name__ for record in records] == ["npu_fused_infer_attention_score.out"]
    graph.replay()
    torch.testing.assert_close(captured, case.fused(torch_npu, [3, 7, 0]), rtol=0, atol=0)


def test_torch_npu_brackets_paged_attention_itself_on_7_2s_pytorch_2_6_cut_7_3_and_26_0(torch_npu):
    profile = torch_npu.simulator.profile
    case = AttentionCase()
    npu = torch_npu.npu
    captured = torch.full((BATCH,), CAPACITY, dtype=torch.int32)
    # 7.1's op takes no workspace at all (op-plugin 480bc431)
    workspace = case.paged_workspace(torch_npu, captured) if profile.paged_attention_workspace else None
    graph = npu.NPUGraph()
    with npu.graph(graph, auto_dispatch_capture=True):
        case.paged(torch_npu, captured, workspace)
    handled = profile.name in ("7.2-pt2.6", "7.3", "26.0")
    assert len(graph.graph_dispatch_mode.graph_dispatch_records) == (1 if handled else 0)
    if not handled:  # 7.1, and 7.2's 2.7.1/2.8.0 cuts: a plugin must bracket it itself
        with pytest.raises(StaleHostValuesError, match="in no task group"):
            graph.replay()
        return
    new = torch.tensor([5, 2, 9], dtype=torch.int32)
    if profile.name == "7.2-pt2.6":  # re-issues op(*args): the workspace keyword is dropped (L114-120)
        with pytest.raises(MissingWorkspaceError, match="re-issued to update"):
            graph.update(cpu_update_input=[{"context_lens": new}])
    elif profile.name == "7.3":  # args[7] = update_input["context_lens"], unchecked (L135)
        with pytest.raises(KeyError, match="context_lens"):
            graph.update(cpu_update_input=[{"actual_seq_lengths_kv": [5, 2, 9]}])
    else:  # 26.0: a list where the schema says Tensor fails inside the open update
        with pytest.raises(RuntimeError, match="Tensor"):
            graph.update(cpu_update_input=[{"context_lens": [5, 2, 9]}])
        with pytest.raises(SimulatorError, match="still updating"):
            graph.update(cpu_update_input=[{"context_lens": new}])


def test_bracketing_an_op_torch_npu_also_brackets_nests_task_groups(torch_npu):
    """What the plugin did before issue 16: its own bracket around ``_npu_paged_attention``, with torch_npu's
    below it. Nested on 7.2's PyTorch 2.6 cut, 7.3 and 26.0; on 7.1 the op cannot be bracketed at all (its
    kernel allocates its own workspace)."""
    profile = torch_npu.simulator.profile
    case = AttentionCase()
    npu = torch_npu.npu
    captured = torch.full((BATCH,), CAPACITY, dtype=torch.int32)
    workspace = case.paged_workspace(torch_npu, captured) if profile.paged_attention_workspace else None
    graph = npu.NPUGraph()
    if profile.name in ("7.2-pt2.6", "7.3", "26.0"):
        expected = pytest.raises(SimulatorError, match="groups cannot nest")
    elif profile.name == "7.1":
        expected = pytest.raises(MissingWorkspaceError, match="takes no workspace at all")
    else:
        expected = _no_error()
    stream = npu.Stream()
    with npu.stream(stream):
        graph.capture_begin()
        with graph.graph_dispatch_mode:  # as torch.npu.graph(..., auto_dispatch_capture=True) pushes it
            npu.graph_task_group_begin(stream)
            with expected:
                case.paged(torch_npu, captured, workspace)


def test_torch_npu_graph_leaves_its_mode_stream_and_pool_routing_behind_when_capture_end_fails(torch_npu):
    """graphs.py ``graph.__exit__``: ``capture_end()`` first, with no try/finally; C++ ``capture_end`` throws
    before ``endAllocateToPool``. Every line."""
    simulator = torch_npu.simulator
    npu = torch_npu.npu
    graph = npu.NPUGraph()
    default = npu.current_stream()
    simulator.faults.add("capture_end")
    with pytest.raises(RuntimeError, match="AclmdlRICaptureEnd failed"):
        with npu.graph(graph, pool=npu.graph_pool_handle(), auto_dispatch_capture=True):
            AttentionCase().fused(torch_npu, [CAPACITY] * BATCH)
    assert simulator.modes_above_device() == [graph.graph_dispatch_mode]  # every later op goes through it
    assert npu.current_stream() is not default  # the capture stream is still current
    assert simulator.pools_routed  # and the allocator still routes into the dead pool


def test_a_failing_capture_begin_inside_torch_npu_graph_leaves_its_mode_pushed(torch_npu):
    simulator = torch_npu.simulator
    npu = torch_npu.npu
    graph = npu.NPUGraph()
    simulator.faults.add("capture_begin")
    with pytest.raises(RuntimeError, match="AclmdlRICaptureBegin failed"):
        with npu.graph(graph, auto_dispatch_capture=True):
            pass
    assert simulator.modes_above_device() == [graph.graph_dispatch_mode]  # pushed before capture_begin


def test_npugraph_reset_keeps_torch_npus_dispatch_records(torch_npu):
    graph, _ = capture_fused_out_with_auto_dispatch(torch_npu, AttentionCase())
    graph.reset()
    assert len(graph.graph_dispatch_mode.graph_dispatch_records) == 1


def test_torch_npus_dispatch_mode_is_an_infra_mode_from_7_3_and_its_update_stream_shared(torch_npu):
    profile = torch_npu.simulator.profile
    first, second = torch_npu.npu.NPUGraph(), torch_npu.npu.NPUGraph()
    assert first.graph_dispatch_mode.is_infra_mode() is profile.infra_mode
    assert (first.graph_dispatch_mode.update_stream is second.graph_dispatch_mode.update_stream) is profile.shared_update_stream


def test_torch_npus_records_hold_weak_aliases_that_dangle_once_a_recorded_tensor_is_freed(torch_npu):
    """The query below lives outside the graph pool; torch_npu's record holds it weakly (every line). The
    workspace and outputs were allocated by the capture: the pool keeps them, so the update before the query
    is freed works."""
    case = AttentionCase()
    graph, out = capture_fused_out_with_auto_dispatch(torch_npu, case)
    graph.update(cpu_update_input=[{"actual_seq_lengths_kv": [4, 0, 9]}])
    graph.replay()
    torch.testing.assert_close(out[0].view(BATCH, HEADS, HEAD_DIM), case.fused(torch_npu, [4, 0, 9]), rtol=0, atol=0)
    torch_npu.npu.synchronize()
    case.q = None  # the caller frees its query after capture
    with pytest.raises(DanglingRecordError, match="weak alias .* that was freed"):
        graph.update(cpu_update_input=[{"actual_seq_lengths_kv": [1, 2, 3]}])


def test_only_26_0_checks_the_update_inputs_against_the_records(torch_npu):
    profile = torch_npu.simulator.profile
    case = AttentionCase()  # kept alive: the captured task and torch_npu's record read its memory
    graph, _ = capture_fused_out_with_auto_dispatch(torch_npu, case)
    two = [{"actual_seq_lengths_kv": [1, 2, 3]}, {"actual_seq_lengths_kv": [1, 2, 3]}]
    if profile.checks_record_count:
        with pytest.raises(RuntimeError, match="there are 1 operators"):
            graph.update(cpu_update_input=two)
    else:
        graph.update(cpu_update_input=two)  # zip() drops the extra input without a word


# --- installation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILE_PARAMS)
def test_installing_and_uninstalling_leaves_the_process_as_it_was(profile):
    tolist = torch.Tensor.tolist
    assert "torch_npu" not in sys.modules and not hasattr(torch, "npu")
    with installed(profile) as simulator:
        assert sys.modules["torch_npu"].__version__ == profile.version
        assert "SIMULATOR" in sys.modules["torch_npu"].__simulator__
        assert torch.npu.is_available() and simulator.device_count == 1
        # No mode outside a capture, as with real torch_npu; the device queue only while a stream captures.
        assert torch._C._len_torch_dispatch_stack() == 0
        graph, stream = torch.npu.NPUGraph(), torch.npu.Stream()
        with torch.npu.stream(stream):
            graph.capture_begin()
            stack = torch.utils._python_dispatch._get_current_dispatch_mode_stack()
            assert [type(mode) for mode in stack] == [DeviceQueue] and DeviceQueue.is_infra_mode()
            graph.capture_end()
        assert torch._C._len_torch_dispatch_stack() == 0
    assert "torch_npu" not in sys.modules and "torch_npu.npu" not in sys.modules and not hasattr(torch, "npu")
    assert torch.Tensor.tolist is tolist and torch._C._len_torch_dispatch_stack() == 0
    with pytest.raises(SimulatorError, match="not installed"):
        from support.npu_simulator.state import current

        current()


@pytest.mark.parametrize("profile", PROFILE_PARAMS)
def test_a_mode_left_behind_by_torch_npu_is_popped_when_the_simulator_is_removed(profile):
    with installed(profile) as simulator:
        npu = sys.modules["torch_npu"].npu
        simulator.faults.add("capture_begin")
        with pytest.raises(RuntimeError):
            with npu.graph(npu.NPUGraph(), auto_dispatch_capture=True):
                pass
    assert torch._C._len_torch_dispatch_stack() == 0


class _no_error:  # noqa: N801 - reads like pytest.raises at the call site
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
