"""A forward compiled once for every bucket: torch.compile with the token (batch) dimension dynamic.

Used for piecewise capture (with ``PiecewiseBackend``) and for ``compiler: inductor`` in full and breakable
modes (with ``InductorBackend``): either way one compile serves every bucket, and graphhal captures it.
"""

from __future__ import annotations

import types
from typing import Any, Callable, Iterable

import torch
import torch.fx.experimental._config as fx_config
from torch.utils import _pytree as pytree

from hal import token_specialization
from hal.errors import GraphHalError


class InductorBackend:
    """Inductor, without its own CUDA graphs (graphhal captures the compiled forward), counting compiles."""

    def __init__(self) -> None:
        self.compile_count = 0
        self.shape_env: Any = None  # the compile's ShapeEnv, to say where a token-size specialisation came from

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        from torch._inductor.compile_fx import compile_fx

        self.compile_count += 1
        fake_mode = torch._guards.detect_fake_mode(example_inputs)
        self.shape_env = fake_mode.shape_env if fake_mode is not None else None
        return compile_fx(gm, example_inputs)


class RecompileError(GraphHalError, RuntimeError):
    """torch.compile compiled a forward again that one compile must serve (a guard failed, or a reset)."""


class CompiledForward:
    """``forward`` compiled with ``backend`` (anything with a ``compile_count``); call it like ``forward``.

    The first call compiles, with dim 0 of every tensor named in ``token_inputs`` marked dynamic and
    size-oblivious (unless that first call has a single token): without that, Dynamo would specialise on the first size and on sizes 0 and 1, and
    compile again for other buckets (a bucket of one token is common in decode). Later calls go straight
    to the compiled code; a recompile is counted by the backend, and ``fullgraph`` turns graph breaks (which
    would hide ops from the split) into errors.

    Shape guards are dropped (``_drop_shape_guards``): the caller must check every input's dtype, shape and
    row count before calling, as graphhal's runners do, or a call of another shape would run code traced
    for the compile's shapes.

    Each ``CompiledForward`` compiles its own copy of a one-line entry function. Dynamo keeps its compiled
    code per code object, at most ``recompile_limit`` (8) entries each, and every backend is an entry of its
    own (a BACKEND_MATCH guard): compiling the shared ``forward`` itself, the ninth runner of one model in a
    process (or the ninth capture retry) would hit the limit. A fresh code object per compile starts empty.
    """

    def __init__(self, forward: Callable[..., Any], backend: Any, token_inputs: Iterable[str]) -> None:
        self.forward = forward
        self.backend = backend
        self.token_inputs = tuple(token_inputs)
        self._entry = _fresh_entry(forward)
        self._compiled = torch.compile(
            self._entry, backend=backend, fullgraph=True, dynamic=False, options={"guard_filter_fn": _drop_shape_guards}
        )

    def __call__(self, **inputs: Any) -> Any:
        if self.backend.compile_count:
            return self._call_compiled(inputs)
        if all(inputs[name].shape[0] == 1 for name in self.token_inputs):
            # Runners compile at their largest bucket, so a first call with one token means one bucket of
            # one token: a static compile serves it (and a symbol hinted at 1 trips Inductor's lowering).
            outputs = self._call_compiled(inputs)
        else:
            for name in self.token_inputs:
                torch._dynamo.mark_dynamic(inputs[name], 0)
            with fx_config.patch(backed_size_oblivious=True):
                outputs = self._call_compiled(inputs)
        if not self.backend.compile_count:
            if not any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(outputs)):
                raise GraphHalError(
                    f"the forward returned {_describe(outputs)}, with no tensor computed from its inputs, so "
                    "torch.compile found no graph to hand graphhal: a captured forward must return tensors "
                    "(or nested dicts, tuples or lists of them)"
                )
            raise GraphHalError(
                "torch.compile ran the forward without calling its backend (compilation is disabled, e.g. by "
                "TORCHDYNAMO_DISABLE=1 or torch.compiler.disable), so nothing would be captured"
            )
        return outputs

    def _call_compiled(self, inputs: dict[str, Any]) -> Any:
        from torch.fx.experimental.symbolic_shapes import ConstraintViolationError

        try:
            return self._compiled(**inputs)
        except ConstraintViolationError as exc:
            # Dynamo raises this when it builds its guards, after the backend: the ShapeEnv the backend saw
            # still holds the user frames where the token dimension was fixed.
            error = token_specialization.from_traced(getattr(self.backend, "shape_env", None))
            if error is None:
                error = token_specialization.TokenSpecializationError(
                    f"torch.compile specialised the token dimension of {', '.join(self.token_inputs)} to one size "
                    f"({exc}); run with TORCH_LOGS=dynamic to see where, or {token_specialization.WORKING_MODES}."
                )
            raise error from exc
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            inner = getattr(exc, "inner_exception", None)
            if isinstance(inner, RecompileError) and not _debug_cache_entries(self._entry.__code__):
                raise RecompileError(
                    "the compiled forward was dropped from torch.compile's cache after its capture "
                    "(torch._dynamo.reset() or torch.compiler.reset() clears every compiled function in the "
                    "process), so torch.compile compiled it again, and its new code would bypass the captured "
                    "graphs. Capture again: make a new runner (or call capture() on one whose capture failed), "
                    "and reset torch.compile only before capturing."
                ) from None
            if isinstance(inner, GraphHalError):
                raise inner from None  # graphhal's own error, not Dynamo's wrapping of it
            raise


def _fresh_entry(forward: Callable[..., Any]) -> Callable[..., Any]:
    """A new function with a code object of its own that calls ``forward`` (see ``CompiledForward``)."""

    def compiled_forward(**inputs: Any) -> Any:
        return forward(**inputs)

    code = compiled_forward.__code__.replace()  # a distinct code object: Dynamo's cache starts empty
    return types.FunctionType(
        code, compiled_forward.__globals__, code.co_name, compiled_forward.__defaults__, compiled_forward.__closure__
    )


def _debug_cache_entries(code: types.CodeType) -> list[Any]:
    return torch._dynamo.eval_frame._debug_get_cache_entry_list(code)


def _describe(outputs: Any) -> str:
    return "None" if outputs is None else f"a {type(outputs).__name__} ({outputs!r:.60})"


def _drop_shape_guards(entries: list[Any]) -> list[bool]:
    """Keep every guard but the symbolic-shape ones.

    Tracing a reshape makes Dynamo guard that the token count is not 1 (a view's strides differ at size 1),
    so a decode bucket of one token would compile a second graph. The traced graph itself is shape-generic,
    and the runner checks every input's dtype, shape and row count before calling, so the shape guards
    protect nothing here (vLLM drops guards for the same reason). Tensor, module and global guards stay.
    """
    return [entry.guard_type != "SHAPE_ENV" for entry in entries]
