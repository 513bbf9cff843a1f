"""The piecewise strategy in hal: splitting ops, one compile for every bucket, per-piece capture and replay."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.symbolic_shapes import ShapeEnv

import hal
from hal.compile import CompiledForward
from hal.piecewise import (
    PiecewiseBackend,
    PiecewisePiece,
    SplittingOpError,
    registered_splitting_ops,
    unregister_splitting_op,
)


@torch.library.custom_op("graphhal_test::scaled_by_host_sum", mutates_args=("out",))
def scaled_by_host_sum(x: torch.Tensor, out: torch.Tensor) -> None:
    """Reads a value on the host, so it can only run eagerly: inside a capture it would be an error."""
    out.copy_(x * (1.0 / (1.0 + abs(x.sum().item()))))


@scaled_by_host_sum.register_fake
def _(x, out) -> None:
    return None


@torch.library.custom_op("graphhal_test::fresh_result", mutates_args=())
def fresh_result(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@fresh_result.register_fake
def _(x):
    return torch.empty_like(x)


class TwoPieceStep(torch.nn.Module):
    """linear -> splitting op (eager, host read) -> elementwise: two captured pieces around one split."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(8, 8, generator=generator).to(device), requires_grad=False)

    def forward(self, *, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        hidden = torch.nn.functional.linear(x, self.weight)
        scaled = torch.empty_like(hidden)  # allocated by the piece before the op: a pool address
        torch.ops.graphhal_test.scaled_by_host_sum(hidden, scaled)
        return torch.relu(scaled) + pos[:, None]


def make_inputs(rows: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(rows, 8, generator=generator).to(device),
        "pos": torch.randint(0, 5, (rows,), generator=generator).float().to(device),
    }


def compile_piecewise(device: hal.Device, buckets, compiler: str = hal.Compiler.EAGER):
    torch._dynamo.reset()
    step = TwoPieceStep(device.torch_device)
    backend = PiecewiseBackend(
        device, device.graph_pool(), buckets, compiler=compiler, splitting_ops=[torch.ops.graphhal_test.scaled_by_host_sum]
    )
    return step, backend, CompiledForward(step, backend, token_inputs=["x", "pos"])


# --- splitting ops ------------------------------------------------------------------------------------------


@pytest.mark.cpu
def test_an_op_returning_a_fresh_tensor_is_refused_at_registration():
    with pytest.raises(SplittingOpError, match=r"returns Tensor.*_with_output.*mutates_args=\('out',\)"):
        hal.register_splitting_op(torch.ops.graphhal_test.fresh_result)
    assert torch.ops.graphhal_test.fresh_result.default not in registered_splitting_ops()


@pytest.mark.cpu
def test_an_op_returning_a_fresh_tensor_is_refused_by_the_backend_too():
    device = hal.get_device("cpu")
    with pytest.raises(SplittingOpError, match=r"graphhal_test.fresh_result.*cannot be a splitting op"):
        PiecewiseBackend(device, None, [4], splitting_ops=[torch.ops.graphhal_test.fresh_result])


@pytest.mark.cpu
def test_a_plain_python_function_cannot_be_a_splitting_op():
    with pytest.raises(SplittingOpError, match=r"not a torch operator.*torch.library"):
        hal.register_splitting_op(lambda x: x)


@pytest.mark.cpu
def test_registration_covers_every_overload_and_can_be_undone():
    hal.register_splitting_op(torch.ops.graphhal_test.scaled_by_host_sum)
    try:
        assert torch.ops.graphhal_test.scaled_by_host_sum.default in registered_splitting_ops()
    finally:
        unregister_splitting_op(torch.ops.graphhal_test.scaled_by_host_sum)
    assert torch.ops.graphhal_test.scaled_by_host_sum.default not in registered_splitting_ops()


@pytest.mark.cpu
def test_the_reference_models_attention_ops_are_registered_by_default():
    import graphhal.refmodel  # noqa: F401  (registers its ops on import)

    assert torch.ops.graphhal.decode_attention.default in registered_splitting_ops()


# --- capture and replay ---------------------------------------------------------------------------------


def test_pieces_capture_per_bucket_largest_first_and_replay_equal_eager(graph_device):
    device = hal.get_device(graph_device)
    step, backend, compiled = compile_piecewise(device, [8, 4, 1])
    with torch.no_grad():
        static = {rows: make_inputs(rows, device.torch_device, seed=rows) for rows in (8, 4, 1)}
        for rows in (8, 4, 1):  # capture calls, largest first, as a runner makes them
            torch.testing.assert_close(compiled(**static[rows]), step(**static[rows]))
        assert backend.compile_count == 1  # one compile, three buckets (one of them a single token)
        assert len(backend.pieces) == 2 and backend.num_splits == 1
        assert all(sorted(piece.graphs) == [1, 4, 8] for piece in backend.pieces)
        for seed in range(3):  # replays with new data in the same static tensors
            for rows in (1, 8, 4):
                fresh = make_inputs(rows, device.torch_device, seed=100 + seed)
                for name, tensor in static[rows].items():
                    tensor.copy_(fresh[name])
                expected = step(**fresh)
                torch.testing.assert_close(compiled(**static[rows]), expected)
        assert backend.compile_count == 1


def test_a_token_count_outside_the_buckets_runs_the_compiled_pieces_without_graphs(graph_device):
    device = hal.get_device(graph_device)
    step, backend, compiled = compile_piecewise(device, [8, 4])
    with torch.no_grad():
        compiled(**make_inputs(8, device.torch_device, seed=0))
        odd = make_inputs(3, device.torch_device, seed=1)
        torch.testing.assert_close(compiled(**odd), step(**odd))
    assert all(3 not in piece.graphs for piece in backend.pieces)
    assert backend.compile_count == 1


def test_an_input_at_a_new_address_on_a_buckets_first_replay_is_refused(graph_device):
    device = hal.get_device(graph_device)
    _, _, compiled = compile_piecewise(device, [4])
    with torch.no_grad():
        captured_with = make_inputs(4, device.torch_device, seed=0)
        compiled(**captured_with)  # capture
        moved = make_inputs(4, device.torch_device, seed=1)  # same shapes, new tensors: new addresses
        with pytest.raises(hal.StaticAddressError, match=r"piece 0 .*bucket 4.*l_inputs_x_.*splitting op must write"):
            compiled(**moved)


def test_a_failed_piece_capture_can_be_dropped_and_captured_again(graph_device):
    device = hal.get_device(graph_device)
    step, backend, compiled = compile_piecewise(device, [4])
    inputs = make_inputs(4, device.torch_device, seed=0)
    with torch.no_grad():
        compiled(**inputs)
        backend.drop_graphs(device.graph_pool())
        assert all(not piece.graphs for piece in backend.pieces)
        torch.testing.assert_close(compiled(**inputs), step(**inputs))
    assert all(sorted(piece.graphs) == [4] for piece in backend.pieces)


@pytest.mark.cpu
def test_the_cpu_device_refuses_inductor_pieces_it_could_not_record():
    from runners import DecodeConfig

    device = hal.get_device("cpu")
    assert "Inductor's fused C++ kernels" in device.compiled_capture_problem("piecewise", hal.Compiler.INDUCTOR)
    assert device.compiled_capture_problem("piecewise", hal.Compiler.EAGER) is None
    with pytest.raises(hal.UnsupportedModeError, match=r"mode 'piecewise' with compiler 'inductor'.*use compiler 'eager'"):
        DecodeConfig(mode="piecewise", compiler="inductor").check_device(device)


@pytest.mark.cuda
def test_inductor_pieces_replay_equal_eager_on_cuda():
    device = hal.get_device("cuda")
    step, backend, compiled = compile_piecewise(device, [8, 2], compiler="inductor")
    with torch.no_grad():
        static = {rows: make_inputs(rows, device.torch_device, seed=rows) for rows in (8, 2)}
        for rows in (8, 2):
            compiled(**static[rows])
        for rows in (2, 8):
            fresh = make_inputs(rows, device.torch_device, seed=50 + rows)
            for name, tensor in static[rows].items():
                tensor.copy_(fresh[name])
            torch.testing.assert_close(compiled(**static[rows]), step(**fresh))
    assert backend.compile_count == 1
    assert all(isinstance(piece, PiecewisePiece) and sorted(piece.graphs) == [2, 8] for piece in backend.pieces)


@pytest.mark.cuda
def test_without_piece_capture_the_splitting_ops_become_the_breaks_of_a_breakable_graph():
    # What compiler "inductor" in breakable mode builds: compiled pieces inside the segments, the splitting
    # ops eager between them. Pieces compiled "eager" here; cuda only, because torch.compile refuses to run
    # under the cpu recorder's dispatch mode.
    device = hal.get_device("cuda")
    torch._dynamo.reset()
    step = TwoPieceStep(device.torch_device)
    backend = PiecewiseBackend(
        device, None, (), splitting_ops=[torch.ops.graphhal_test.scaled_by_host_sum], splitting_ops_as_break_points=True
    )
    compiled = CompiledForward(step, backend, token_inputs=["x", "pos"])
    static = make_inputs(4, device.torch_device, seed=0)
    pool = device.graph_pool()
    with torch.no_grad():
        compiled(**static)  # compile outside the capture, as a runner's warm-up does
        graph = device.make_graph("breakable")
        with device.capture_session(graph, pool):
            outputs = compiled(**static)
        assert graph.num_breaks == 1
        fresh = make_inputs(4, device.torch_device, seed=9)
        for name, tensor in static.items():
            tensor.copy_(fresh[name])
        device.replay(graph)
        torch.testing.assert_close(outputs, step(**fresh))
    assert all(not piece.graphs for piece in backend.pieces)


def test_a_single_one_token_bucket_compiles_statically_and_still_captures(graph_device):
    device = hal.get_device(graph_device)
    step, backend, compiled = compile_piecewise(device, [1])
    with torch.no_grad():
        static = make_inputs(1, device.torch_device, seed=0)
        compiled(**static)
        fresh = make_inputs(1, device.torch_device, seed=7)
        for name, tensor in static.items():
            tensor.copy_(fresh[name])
        torch.testing.assert_close(compiled(**static), step(**fresh))
    assert backend.compile_count == 1
    assert all(sorted(piece.graphs) == [1] for piece in backend.pieces)


# --- the token dimension stays symbolic ---------------------------------------------------------------------


class UpsampledStep(torch.nn.Module):
    """A composite op whose C++ decomposition reads concrete sizes (interpolate; matmul on torch 2.11, which
    is what broke transformers' rotary embedding): run outside the python dispatcher, as the backend ran its
    fake pass before, it fixed the token dimension to the compile's bucket."""

    def forward(self, *, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        upsampled = torch.nn.functional.interpolate(x[:, None, :], scale_factor=2)  # the sizing op
        return upsampled[:, 0, ::2] + pos[:, None]


def compile_upsampled(device: hal.Device, buckets):
    torch._dynamo.reset()
    step = UpsampledStep()
    backend = PiecewiseBackend(device, device.graph_pool(), buckets, splitting_ops=[])
    return step, backend, CompiledForward(step, backend, token_inputs=["x", "pos"])


def test_the_backends_fake_pass_keeps_the_token_dimension_symbolic(graph_device):
    device = hal.get_device(graph_device)
    step, backend, compiled = compile_upsampled(device, [8, 4])
    with torch.no_grad():
        static = {rows: make_inputs(rows, device.torch_device, seed=rows) for rows in (8, 4)}
        for rows in (8, 4):  # fails at the first call without the python dispatcher: ConstraintViolationError
            torch.testing.assert_close(compiled(**static[rows]), step(**static[rows]))
    assert backend.compile_count == 1


@pytest.mark.cpu
def test_a_specialisation_during_the_backends_fake_pass_names_the_model_line(monkeypatch):
    # Without the python dispatcher (as before the fix) interpolate specialises in the backend: the error
    # names the line of the model that did it, from the FX node's stack trace.
    import contextlib

    import hal.piecewise.backend

    monkeypatch.setattr(hal.piecewise.backend, "enable_python_dispatcher", contextlib.nullcontext)
    device = hal.get_device("cpu")
    _, _, compiled = compile_upsampled(device, [8, 4])
    with torch.no_grad(), pytest.raises(hal.TokenSpecializationError) as error:
        compiled(**make_inputs(8, device.torch_device, seed=0))
    message = str(error.value)
    assert ".size()[0]) was specialised to 8" in message  # x and pos share the symbol: either is named
    assert f"{__file__}:" in message and "in forward: upsampled = " in message and "the sizing op" in message
    assert "mode 'full' (decode) or 'breakable'" in message


# torch 2.6 and 2.7 keep no traced stack per specialisation, only a one-line note of the user line, with the
# file name shortened (hal.token_specialization): the file is named, its full path is not.
_FILE_AS_TORCH_NAMES_IT = (
    __file__
    if any(hasattr(ShapeEnv(), stacks) for stacks in ("specialization_stacks", "user_specialization_stacks"))
    else "tests/test_piecewise_backend.py"
)


class RowLoopStep(torch.nn.Module):
    """Model code that truly fixes the row count: a Python loop over the rows (one iteration per row)."""

    def forward(self, *, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        rows = [row * 2 for row in x.unbind(0)]  # the specialising line
        return torch.stack(rows) + pos[:, None]


@pytest.mark.cpu
def test_model_code_that_fixes_the_token_dimension_gets_an_error_naming_its_line_and_a_mode_that_works():
    from runners import DecodeConfig, DecodeRunner, InputSlot

    torch._dynamo.reset()
    slots = [InputSlot("x", torch.float32, row_shape=(8,)), InputSlot("pos", torch.float32)]
    piecewise = DecodeRunner(RowLoopStep(), slots, "cpu", DecodeConfig(mode="piecewise", max_bs=8, show_progress=False))
    with pytest.raises(hal.CaptureError) as error:
        piecewise.capture()
    assert isinstance(error.value.__cause__, hal.TokenSpecializationError)
    message = str(error.value)
    assert f"{_FILE_AS_TORCH_NAMES_IT}:" in message and "the specialising line" in message
    assert ".size()[0]) was specialised to 8" in message and "mode 'full' (decode) or 'breakable'" in message
    full = DecodeRunner(RowLoopStep(), slots, "cpu", DecodeConfig(mode="full", max_bs=8, show_progress=False))
    full.capture()  # the mode the error suggests works
    batch = make_inputs(3, torch.device("cpu"), seed=4)
    torch.testing.assert_close(full.run(batch), RowLoopStep()(**batch))


@pytest.mark.cpu
def test_a_specialisation_reported_by_dynamos_guards_names_the_model_line_too():
    # Backends that do not split (compiler "inductor" in full mode) compile the specialised graph, and Dynamo
    # raises ConstraintViolationError when it builds its guards: the error says where instead.
    class CountingBackend:
        compile_count = 0
        shape_env = None

        def __call__(self, gm, example_inputs):
            self.compile_count += 1
            self.shape_env = torch._guards.detect_fake_mode(example_inputs).shape_env
            return gm

    torch._dynamo.reset()
    compiled = CompiledForward(RowLoopStep(), CountingBackend(), token_inputs=["x", "pos"])
    with torch.no_grad(), pytest.raises(hal.TokenSpecializationError, match=r"specialised to 8 at .*the specialising line"):
        compiled(**make_inputs(8, torch.device("cpu"), seed=0))
