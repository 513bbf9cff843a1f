"""Ops declare how far they can be captured; runners choose and check their mode from it (mode auto, full).

Three test ops stand for three kinds of attention: one that reads everything from device memory (any batch),
one whose launch only suits decode batches, one that reads lengths on the host (never). Each doubles its
input into ``out`` (a splitting op's convention), so results are easy to check against eager.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch

import hal
from hal.graph_support import graph_support_of, ops_reached
from runners import DecodeConfig, DecodeRunner, InputSlot, PrefillConfig, PrefillRunner
from hal.graph_support import OpNotCapturableError
from support.dispatch_mode_flags import restored_dispatch_mode_flags  # noqa: F401 (a fixture)

pytestmark = pytest.mark.cpu


def _double(x: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(x * 2)


def _define(name: str) -> torch._ops.OpOverload:
    op = torch.library.custom_op(f"graphhal_test::{name}", mutates_args=("out",))(_double)
    op.register_fake(lambda x, out: None)
    return getattr(torch.ops.graphhal_test, name).default


ANY_BATCH_OP = _define("support_any_batch")
DECODE_ONLY_OP = _define("support_uniform_decode")
HOST_LENGTHS_OP = _define("support_never")
UNSPLIT_NEVER_OP = _define("support_never_unsplit")  # declared never, but neither a splitting op nor a break point
hal.declare_graph_support(ANY_BATCH_OP, hal.GraphSupport.ANY_BATCH)
hal.declare_graph_support(UNSPLIT_NEVER_OP, hal.GraphSupport.NEVER)
hal.declare_graph_support(DECODE_ONLY_OP, hal.GraphSupport.UNIFORM_DECODE)
hal.declare_graph_support(HOST_LENGTHS_OP, hal.GraphSupport.NEVER)
hal.register_splitting_op(HOST_LENGTHS_OP)
hal.register_splitting_op(DECODE_ONLY_OP)


class Step(torch.nn.Module):
    """x -> (x @ w) through ``op`` -> + 1: the op sits between two capturable halves."""

    def __init__(self, op: torch._ops.OpOverload) -> None:
        super().__init__()
        self.op = op
        self.weight = torch.nn.Parameter(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)), requires_grad=False)

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        hidden = x @ self.weight
        out = torch.empty_like(hidden)
        self.op(hidden, out)
        return out + lens[:1].float()


SLOTS = [InputSlot("x", torch.float32, row_shape=(4,))]
REQUEST_SLOTS = [InputSlot("lens", torch.int32, role=hal.SlotRole.SEQ_LENS)]


def decode_runner(op, **config) -> DecodeRunner:
    step = Step(op)
    return DecodeRunner(
        lambda x: step(x, torch.zeros(1, dtype=torch.int32)), SLOTS, "cpu",
        DecodeConfig(buckets=[1, 2, 4], show_progress=False, **config),
    )


def prefill_runner(op, **config) -> PrefillRunner:
    return PrefillRunner(Step(op), SLOTS, REQUEST_SLOTS, "cpu", PrefillConfig(buckets=[2, 8], max_requests=2, show_progress=False, **config))


def equals_eager(runner, rows: int) -> None:
    x = torch.randn(rows, 4)
    weight = Step(ANY_BATCH_OP).weight
    if isinstance(runner, DecodeRunner):
        batch, expected = {"x": x}, x @ weight * 2
    else:
        batch, expected = {"x": x, "lens": torch.tensor([3], dtype=torch.int32)}, x @ weight * 2 + 3
    torch.testing.assert_close(runner.run(batch), expected)


@contextmanager
def logged(name: str) -> Iterator[list[str]]:
    """The INFO lines logger ``name`` emits inside the block."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


# --- declarations ---------------------------------------------------------------------------------------------


def test_a_per_device_declaration_wins_over_the_all_devices_one():
    op = _define("support_per_device")
    assert graph_support_of(op, "cpu") is None  # declared nothing: no constraint
    hal.declare_graph_support(op, "never")
    hal.declare_graph_support(torch.ops.graphhal_test.support_per_device, hal.GraphSupport.ANY_BATCH, device_types=["cuda"])
    assert graph_support_of(op, "cuda") == hal.GraphSupport.ANY_BATCH
    assert graph_support_of(op, "cpu") == graph_support_of(op, "npu") == hal.GraphSupport.NEVER


def test_declarations_are_checked():
    with pytest.raises(ValueError, match="'sometimes' is not a valid GraphSupport"):
        hal.declare_graph_support(ANY_BATCH_OP, "sometimes")
    with pytest.raises(TypeError, match="list of device type names, got the string 'cuda'"):
        hal.declare_graph_support(ANY_BATCH_OP, "never", device_types="cuda")
    with pytest.raises(TypeError, match="is not a torch operator"):
        hal.declare_graph_support(_double, "never")


def test_what_each_support_allows():
    decode, mixed = hal.BatchKind.UNIFORM_DECODE, hal.BatchKind.MIXED
    assert hal.GraphSupport.ANY_BATCH.allows(decode) and hal.GraphSupport.ANY_BATCH.allows(mixed)
    assert hal.GraphSupport.UNIFORM_DECODE.allows(decode) and not hal.GraphSupport.UNIFORM_DECODE.allows(mixed)
    assert not hal.GraphSupport.NEVER.allows(decode)


def test_ops_reached_lists_declared_ops_and_required_break_points_most_restrictive_first():
    @hal.break_point(name="host_sync_point")
    def syncs(x):
        return x

    def forward(x):
        out = torch.empty_like(x)
        ANY_BATCH_OP(x, out)
        HOST_LENGTHS_OP(out, out)
        return syncs(out.relu())  # relu: declared nothing, not listed

    reached = ops_reached(forward, {"x": torch.ones(2)}, "cpu")
    assert [(op.name, op.support) for op in reached] == [
        ("graphhal_test::support_never", "never"),
        ("host_sync_point", "never"),
        ("graphhal_test::support_any_batch", "any_batch"),
    ]


def test_probes_on_two_threads_ending_out_of_order_leave_torch_compile_working(restored_dispatch_mode_flags):
    # torch 2.10 and earlier read one flag of the process for "a dispatch mode is active", which each mode
    # restores on exit to what it found on entry: other thread in, this thread in, other thread out, this
    # thread out would leave torch.compile skipping every frame of the process (hal.graph_support._Probe).
    inside, leave = threading.Event(), threading.Event()

    def forward_that_waits(x):
        inside.set()
        leave.wait(30)
        return x + 1

    def forward_that_lets_the_other_finish(x):
        leave.set()
        other.join()
        return x + 1

    other = threading.Thread(target=ops_reached, args=(forward_that_waits, {"x": torch.ones(2)}, "cpu"))
    other.start()
    assert inside.wait(30)
    ops_reached(forward_that_lets_the_other_finish, {"x": torch.ones(2)}, "cpu")
    torch._dynamo.reset()
    compiled = []
    torch.compile(lambda x: x * 2 + 1, backend=lambda gm, inputs: compiled.append(gm) or gm)(torch.ones(3))
    assert compiled


# --- the runners' choice --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "runner, op, chosen",
    [
        (decode_runner, ANY_BATCH_OP, "full"),
        (decode_runner, DECODE_ONLY_OP, "full"),
        (decode_runner, HOST_LENGTHS_OP, "piecewise"),
        (prefill_runner, ANY_BATCH_OP, "full"),
        (prefill_runner, DECODE_ONLY_OP, "piecewise"),
        (prefill_runner, HOST_LENGTHS_OP, "piecewise"),
    ],
)
def test_mode_auto_picks_full_where_every_op_allows_it_and_piecewise_otherwise(runner, op, chosen):
    torch._dynamo.reset()
    made = runner(op)
    assert made.config.mode == "auto"
    with logged("runners.capture_loop") as lines:
        report = made.capture()
    assert made.config.mode == report.mode == chosen and made.requested_mode == "auto"
    assert f"mode auto chose {chosen}" in made.mode_reason and any(made.mode_reason in line for line in lines)
    if chosen == "piecewise":
        assert made.config.compiler == "eager"  # auto's "none" means "as written": piecewise traces anyway
        assert op._schema.name in made.mode_reason
        assert made._capture.strategy.backend.num_splits == 1  # at the op that cannot be captured
    for rows in (1, 2, 3):
        equals_eager(made, rows)


def test_mode_auto_takes_breakable_for_a_required_break_point_that_is_no_splitting_op():
    @hal.break_point(name="reads_lengths_on_the_host")
    def host_step(x):
        return x * 2

    runner = DecodeRunner(lambda x: host_step(x) + 1, SLOTS, "cpu", DecodeConfig(buckets=[2], show_progress=False))
    runner.capture()
    assert runner.config.mode == "breakable"
    assert "reads_lengths_on_the_host (never)" in runner.mode_reason
    x = torch.randn(2, 4)
    torch.testing.assert_close(runner.run({"x": x}), x * 2 + 1)


@pytest.mark.parametrize("runner, op", [(prefill_runner, DECODE_ONLY_OP), (decode_runner, HOST_LENGTHS_OP)])
def test_mode_full_over_an_op_that_cannot_be_captured_is_refused_naming_the_op(runner, op):
    made = runner(op, mode="full")
    with pytest.raises(OpNotCapturableError, match=rf"mode 'full' cannot capture.*{op._schema.name}.*'auto'"):
        made.capture()
    assert not made.captured and made.graphs == {}


@pytest.mark.parametrize("runner, op, splits", [(decode_runner, DECODE_ONLY_OP, 0), (prefill_runner, DECODE_ONLY_OP, 1), (decode_runner, HOST_LENGTHS_OP, 1)])
def test_piecewise_splits_only_at_ops_that_cannot_be_captured_in_the_runners_batches(runner, op, splits):
    # An op captured inside its piece costs nothing per step; one run eagerly between pieces costs its launch.
    torch._dynamo.reset()
    made = runner(op, mode="piecewise")
    made.capture()
    assert made._capture.strategy.backend.num_splits == splits
    for rows in (1, 2):
        equals_eager(made, rows)


def test_modes_asked_for_by_name_are_taken_as_they_are():
    made = prefill_runner(ANY_BATCH_OP, mode="breakable")
    made.capture()
    assert made.config.mode == "breakable" and made.mode_reason == "mode breakable as configured"


# --- an op that cannot be captured, wherever it is reached ----------------------------------------------------


def test_mode_auto_refuses_an_op_no_mode_can_run_eagerly_naming_it():
    # Neither a splitting op (piecewise would split at it) nor reached in a break point (breakable would cut
    # there): every mode would capture it, so auto says what to change instead of capturing it in a segment.
    made = decode_runner(UNSPLIT_NEVER_OP)
    with pytest.raises(OpNotCapturableError, match=r"no graph mode.*graphhal_test::support_never_unsplit.*register_splitting_op.*break_point"):
        made.capture()
    assert not made.captured and made.graphs == {}


def test_mode_auto_takes_breakable_for_an_op_reached_only_inside_break_points():
    @hal.break_point(name="host_attention", required=False)
    def attention(x):
        out = torch.empty_like(x)
        UNSPLIT_NEVER_OP(x, out)
        return out

    runner = DecodeRunner(lambda x: attention(x + 1) * 3, SLOTS, "cpu", DecodeConfig(buckets=[1, 2], show_progress=False))
    runner.capture()
    assert runner.config.mode == "breakable" and "reached in break points" in runner.mode_reason
    x = torch.randn(2, 4)
    torch.testing.assert_close(runner.run({"x": x}), (x + 1) * 2 * 3)


def test_an_op_reached_inside_a_capture_that_cannot_be_captured_fails_that_capture_naming_op_and_bucket():
    # The op is chosen at batches of up to 2 rows only: mode auto's eager run at the largest bucket (4) never
    # reaches it and picks full; capturing bucket 2 reaches it and must fail, not capture it inline.
    def forward(x):
        if x.shape[0] > 2:
            return x * 2
        out = torch.empty_like(x)
        HOST_LENGTHS_OP(x, out)
        return out

    runner = DecodeRunner(forward, SLOTS, "cpu", DecodeConfig(buckets=[1, 2, 4], show_progress=False))
    with pytest.raises(hal.CaptureError, match=r"bucket 2.*graphhal_test::support_never \(never\) was reached while capturing a 'full' graph"):
        runner.capture()
    assert not runner.captured and runner.graphs == {}
    # Asked for by name, breakable captures it inline just the same: refused as well.
    explicit = DecodeRunner(forward, SLOTS, "cpu", DecodeConfig(mode="breakable", buckets=[1, 2, 4], show_progress=False))
    with pytest.raises(hal.CaptureError, match=r"graphhal_test::support_never \(never\) was reached while capturing"):
        explicit.capture()
    # Where the op is split off, the same forward captures and runs.
    torch._dynamo.reset()
    split = DecodeRunner(forward, SLOTS, "cpu", DecodeConfig(mode="piecewise", buckets=[1, 2, 4], show_progress=False))
    split.capture()
    x = torch.randn(2, 4)
    torch.testing.assert_close(split.run({"x": x}), x * 2)
