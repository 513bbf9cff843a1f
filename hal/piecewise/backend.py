"""The piecewise strategy: a torch.compile backend that captures a model piece by piece.

    backend = PiecewiseBackend(device, pool, buckets=[8, 16, 32])
    compiled = CompiledForward(model, backend, token_inputs=["input_ids", "positions"])

torch.compile hands the backend the model's FX graph once, with the token dimension symbolic. The backend
cuts it at the splitting ops (attention), compiles every other piece (``eager``: as traced; ``inductor``:
fused kernels), and puts a ``PiecewisePiece`` in each piece's place. Calling the compiled model at a bucket
the first time warms up and captures every piece into the shared pool, each as a full graph of the device;
later calls at that bucket replay the pieces and run the splitting ops eagerly between them. One compile
serves every bucket: the token count is a symbol, not a constant (``compile_count`` stays at one).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Sequence

import torch
from torch._dispatch.python import enable_python_dispatcher

from hal.breakable import BreakPoint
from hal.compile import token_specialization
from hal.compile.compiled_forward import RecompileError, inductor_config_patches
from hal.device import Device
from hal.errors import GraphHalError, UnsupportedModeError
from hal.graph_modes import Compiler, GraphMode
from hal.graph_per_key import AfterWarmup
from hal.graph_strategies import register_strategy
from hal.piecewise.piece import PieceCaptures, PiecewisePiece, ShapeKey
from hal.piecewise.split import split_at_ops
from hal.piecewise.splitting_ops import resolve_splitting_ops

PIECE_COMPILERS = (Compiler.EAGER, Compiler.INDUCTOR)


class PiecewiseBackend:
    """A torch.compile backend splitting at ``splitting_ops`` (default: every registered one).

    device, pool:  where the pieces are captured: one pool shared by every piece and bucket.
    buckets:       the token counts to capture; any other count runs the compiled pieces without graphs.
    compiler:      how each piece is compiled: ``eager`` (as traced) or ``inductor``.
    splitting_ops_as_break_points:
                   True: the pieces capture nothing themselves (``buckets`` must be empty) and each
                   splitting op becomes a break point, so a breakable graph around the compiled forward
                   cuts there (``compiler: inductor`` in breakable mode: fused kernels in the segments, the
                   splitting ops eager between them).
    after_warmup:  called after each piece's warm-up, before its capture (``GraphPerKey``): across
                   ranks, where they agree that every rank warmed up.
    """

    def __init__(
        self,
        device: Device,
        pool: Any,
        buckets: Iterable[int],
        *,
        compiler: str = Compiler.EAGER,
        warmup_runs: int = 1,
        splitting_ops: Iterable[Any] | None = None,
        splitting_ops_as_break_points: bool = False,
        after_warmup: AfterWarmup | None = None,
    ) -> None:
        if compiler not in PIECE_COMPILERS:
            raise ValueError(f"unknown piece compiler {compiler!r}; choose one of: {', '.join(PIECE_COMPILERS)}")
        buckets = frozenset(buckets)
        if splitting_ops_as_break_points and buckets:
            raise ValueError("with splitting_ops_as_break_points the pieces capture nothing: pass no buckets")
        self.compiler = compiler
        self.splitting_ops = resolve_splitting_ops(splitting_ops)
        self.splitting_ops_as_break_points = splitting_ops_as_break_points
        self.captures = PieceCaptures(device, pool, buckets, warmup_runs, after_warmup)
        self.compile_count = 0
        self.pieces: list[PiecewisePiece] = []
        self.num_splits = 0
        self.shape_env: Any = None  # the compile's ShapeEnv, to say where a token-size specialisation came from

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
        self.compile_count += 1
        if self.compile_count > 1:
            raise RecompileError(
                "torch.compile is compiling the piecewise forward a second time: a guard of the first compile "
                "failed (grad or inference mode differs from the first call, an input changed dtype or rank, a module "
                "attribute changed...). One compile must serve every bucket; run with TORCH_LOGS=recompiles "
                "to see which guard failed."
            )
        split = split_at_ops(gm, self.splitting_ops)
        # Dynamo's fake mode remembers the fake (symbolic-shaped) twin of every real example input.
        fake_mode = torch._guards.detect_fake_mode(example_inputs)
        fake_inputs = [
            fake_mode.from_tensor(value) if fake_mode is not None and isinstance(value, torch.Tensor) else value
            for value in example_inputs
        ]
        self.shape_env = fake_mode.shape_env if fake_mode is not None else None
        token_symbol = _token_symbol(fake_inputs)
        if token_symbol is None and len(self.captures.buckets) > 1:
            traced = token_specialization.from_traced(self.shape_env)
            if traced is not None:  # marked dynamic, but the model's code fixed it while Dynamo traced
                raise traced
            raise GraphHalError(
                "the piecewise backend got a graph with no dynamic dimension: one compile must serve every "
                "token-count bucket, so compile with the token dimension marked dynamic "
                "(hal.compile.CompiledForward does this when the first call has more than one token)"
            )
        compiler = _PieceCompiler(split.module, set(split.pieces), self, token_symbol, _producer_of_outputs(split.module))
        # The python dispatcher, as Dynamo and AOTAutograd use when they run a graph on fake tensors: without
        # it, composite ops run their C++ decomposition, and one that reads concrete sizes (matmul in torch
        # 2.11, interpolate in 2.13) specialises the token dimension to this bucket in the shared ShapeEnv,
        # so the compile would serve one size only (ConstraintViolationError when Dynamo builds its guards).
        with fake_mode if fake_mode is not None else contextlib.nullcontext(), enable_python_dispatcher():
            compiler.run(*fake_inputs)
        for name, piece in compiler.compiled.items():
            split.module.__dict__[name] = piece  # shadows the submodule: the split graph calls the piece
        if self.splitting_ops_as_break_points:
            for name in split.splits:
                op = split.ops[name]
                split.module.__dict__[name] = BreakPoint(getattr(split.module, name), name=str(op), required=False)
        self.pieces.extend(compiler.compiled.values())
        self.num_splits += len(split.splits)
        return split.module

    def let_outputs_leave(self, bucket: int) -> None:
        """Call once the whole forward is captured at ``bucket``: every piece keeps only non-owning aliases of
        its outputs there, so the next (smaller) bucket's capture reuses their pool memory and the pool for all
        buckets stays near the largest one's. A replay of a bucket rewrites every piece's outputs before any
        later piece or splitting op reads them, so nothing of another bucket must survive in that memory."""
        for piece in self.pieces:
            piece.let_outputs_leave(bucket)

    def drop_graphs(self, pool: Any) -> None:
        """Forget every captured piece graph (after a failed capture); the next calls capture into ``pool``.

        Pass a new pool unless other graphs still live in the old one: a device may release a pool when its
        last graph dies (CUDA does), and capturing into the released handle fails.
        """
        for piece in self.pieces:
            piece.drop_graphs(pool)
        self.captures.pool = pool

    def release(self) -> None:
        """Drop every piece graph and let go of the pool for good (the runner is done with this compile).

        torch.compile keeps every backend it was given for the life of the process (Dynamo's
        ``cached_backends``, cleared only by ``torch._dynamo.reset()``), so whatever the backend still held
        would stay allocated: the pieces' graphs, the outputs they keep for the next piece, the pool.
        """
        self.drop_graphs(None)
        self.pieces.clear()


def _no_single_graph(device: Device) -> Any:
    raise UnsupportedModeError(
        "a piecewise graph is not one graph object: compile the forward with hal.piecewise.PiecewiseBackend "
        "(runners do this for mode 'piecewise'), which captures each piece as a full graph"
    )


register_strategy(GraphMode.PIECEWISE, _no_single_graph)


class _PieceCompiler(torch.fx.Interpreter):
    """Runs the split graph on fake inputs, compiling each piece with the (symbolic) arguments it gets."""

    def __init__(
        self, module: torch.fx.GraphModule, pieces: set[str], backend: PiecewiseBackend, token_symbol: Any, final: str | None
    ) -> None:
        super().__init__(module)
        self.extra_traceback = False  # its notes name split-graph nodes, which have no model source line
        self.pieces = pieces
        self.backend = backend
        self.token_symbol = token_symbol
        self.final = final  # the piece whose outputs are the forward's outputs
        self.compiled: dict[str, PiecewisePiece] = {}
        self.arg_names = {
            node.target: [str(arg) for arg in node.args] for node in module.graph.nodes if node.op == "call_module"
        }

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target in self.pieces and self.token_symbol is not None:
            shape_env = self.backend.shape_env
            outputs = _SpecializationWatch(self.fetch_attr(target), shape_env, self.token_symbol).run(*args)
        else:
            outputs = super().call_module(target, args, kwargs)
        if target in self.pieces:
            submodule = self.fetch_attr(target)
            compiled = _compile_piece(submodule, list(args), self.backend.compiler)
            self.compiled[target] = PiecewisePiece(
                target,
                len(self.compiled),
                compiled,
                self._shape_key(args),
                self.backend.captures,
                self.arg_names[target],
                outputs_leave=target == self.final,
            )
        return outputs


    def _shape_key(self, args: Any) -> ShapeKey | None:
        if self.token_symbol is None:  # a static compile for its one bucket (if any): every call has that shape
            buckets = self.backend.captures.buckets
            return ShapeKey(constant=next(iter(buckets))) if buckets else None
        return _shape_key(args, self.token_symbol)


class _SpecializationWatch(torch.fx.Interpreter):
    """Runs one piece on fake inputs node by node, and names the model line of a node that specialises the
    token dimension (the ShapeEnv is the compile's own: a constant here would fix it for every bucket)."""

    def __init__(self, module: torch.fx.GraphModule, shape_env: Any, token_symbol: Any) -> None:
        super().__init__(module)
        self.extra_traceback = False  # the error names the model line itself
        self.shape_env = shape_env
        self.token_symbol = token_symbol

    def run_node(self, node: torch.fx.Node) -> Any:
        result = super().run_node(node)
        value = token_specialization.specialized_value(self.shape_env, self.token_symbol)
        if value is not None:
            raise token_specialization.token_specialization_error(
                token_specialization.symbol_inputs(self.shape_env, self.token_symbol),
                value,
                token_specialization.node_location(node),
            )
        return result


def _producer_of_outputs(module: torch.fx.GraphModule) -> str | None:
    """The submodule whose results the split graph returns, when exactly one submodule produces them all."""
    output = next(node for node in module.graph.nodes if node.op == "output")
    producers: set[str] = set()
    torch.fx.node.map_arg(output.args, lambda arg: producers.add(_submodule_behind(arg)) or arg)
    return producers.pop() if len(producers) == 1 else None


def _submodule_behind(node: torch.fx.Node) -> str:
    while node.op == "call_function" and node.args and isinstance(node.args[0], torch.fx.Node):  # getitem
        node = node.args[0]
    return str(node.target) if node.op == "call_module" else ""


def _compile_piece(submodule: torch.fx.GraphModule, fake_args: list[Any], compiler: str) -> Any:
    if compiler == Compiler.EAGER:
        return submodule
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(submodule, fake_args, config_patches=inductor_config_patches())


def _symbol(value: Any) -> Any:
    return value.node.expr if isinstance(value, torch.SymInt) else None


def _token_symbol(fake_inputs: Sequence[Any]) -> Any:
    """The symbol of the token dimension: the first symbolic size among the graph's inputs (None: static)."""
    for value in fake_inputs:
        if isinstance(value, torch.SymInt):
            return _symbol(value)
        if isinstance(value, torch.Tensor):
            for size in value.shape:
                if isinstance(size, torch.SymInt):
                    return _symbol(size)
    return None


def _shape_key(args: Sequence[Any], token_symbol: Any) -> ShapeKey | None:
    """Where this piece reads the token count at run time; None for a piece that does not depend on it."""
    for index, value in enumerate(args):
        if _symbol(value) == token_symbol:
            return ShapeKey(index)
    for index, value in enumerate(args):
        if isinstance(value, torch.Tensor):
            for dim, size in enumerate(value.shape):
                if _symbol(size) == token_symbol:
                    return ShapeKey(index, dim)
    return None
