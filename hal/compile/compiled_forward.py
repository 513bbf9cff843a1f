"""A forward compiled once for every bucket: torch.compile with the token (batch) dimension dynamic.

Used for piecewise capture (with ``PiecewiseBackend``) and for ``compiler: inductor`` in full and breakable
modes (with ``InductorBackend``): either way one compile serves every bucket, and graphhal captures it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import types
from typing import Any, Callable, Iterable

import torch
import torch.fx.experimental._config as fx_config
from torch.utils import _pytree as pytree

from hal.compile import stored_compile, token_specialization
from hal.errors import GraphHalError

logger = logging.getLogger(__name__)


def inductor_config_patches() -> dict[str, Any]:
    """What every Inductor compile of graphhal's runs with: ``emulate_precision_casts``, so a bf16 or fp16
    forward rounds its fused intermediates where its eager ops do. Without it Inductor keeps them in fp32, and
    a last-bit difference picks other experts in a MoE model's top-k routing: a tiny Mixtral in bf16 chose
    another next token at 16 of 320 positions (logits up to 2.3 apart) where eager did not, and with it at
    none (measured on cpu, torch 2.13; the reported case was a Mixtral on an H100 whose full+inductor first
    token scored 6.8 below generate's). The cost is a few casts in fused kernels."""
    import torch._inductor.config as inductor_config

    return {"emulate_precision_casts": True} if hasattr(inductor_config, "emulate_precision_casts") else {}


class InductorBackend:
    """Inductor, without its own CUDA graphs (graphhal captures the compiled forward), counting compiles."""

    storable = True  # its output can be stored (stored_compile): an Inductor graph, bundled by AOTAutograd

    def __init__(self) -> None:
        self.compile_count = 0
        self.shape_env: Any = None  # the compile's ShapeEnv, to say where a token-size specialisation came from
        self.storing = False  # set by CompiledForward while it compiles for a store

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        from torch._inductor.compile_fx import compile_fx

        self.compile_count += 1
        fake_mode = torch._guards.detect_fake_mode(example_inputs)
        self.shape_env = fake_mode.shape_env if fake_mode is not None else None
        compiled = compile_fx(gm, example_inputs, config_patches=inductor_config_patches())
        if self.storing:
            # AOTAutograd's bundled entry, wrapped for storing as torch wraps its own Inductor backend's output
            # (torch 2.11 wraps only backends it knows; a graph that cannot be stored fails the store, not this).
            from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable

            if getattr(compiled, "serialize", None) is not None:
                compiled = BundledAOTAutogradSerializableCallable(compiled)
        return compiled


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

    With a ``store`` (``stored_compile``) and a backend whose output can be stored (``storable``, as
    Inductor's), the first call loads the compile stored under this forward's fingerprint instead, tracing
    nothing (``loaded`` says so), or compiles with ``aot_compile`` and stores the result for the next process.
    That compile keeps no guards at all; the fingerprint and the runner's input checks stand in for them.
    """

    def __init__(
        self,
        forward: Callable[..., Any],
        backend: Any,
        token_inputs: Iterable[str],
        store: stored_compile.CompileStore | None = None,
    ) -> None:
        self.forward = forward
        self.backend = backend
        self.token_inputs = tuple(token_inputs)
        storable = getattr(backend, "storable", False) and stored_compile.available()
        self.store = store if storable else None
        self.loaded = False  # whether the compile came from the store: nothing traced or compiled here
        self._stored: Any = None  # the aot-compiled forward, once stored or loaded: called directly
        self._entry = _fresh_entry(forward)
        self._compiled = torch.compile(
            self._entry, backend=backend, fullgraph=True, dynamic=False, **_guard_filter(_drop_shape_guards)
        )
        self._direct: tuple[types.CodeType, Callable[..., Any]] | None = None  # see _unguarded

    def __call__(self, **inputs: Any) -> Any:
        if self._stored is not None:
            return self._stored(self.forward, **inputs)
        if self.backend.compile_count:
            return self._call_compiled(inputs)
        # Runners compile at their largest bucket, so a first call with one token means one bucket of one
        # token: a static compile serves it (and a symbol hinted at 1 trips Inductor's lowering).
        dynamic = not all(inputs[name].shape[0] == 1 for name in self.token_inputs)
        if self.store is not None:
            return self._call_stored(inputs, dynamic)
        if not dynamic:
            outputs = self._call_compiled(inputs)
        else:
            for name in self.token_inputs:
                torch._dynamo.mark_dynamic(inputs[name], 0)
            with _backed_size_oblivious():
                outputs = self._call_compiled(inputs)
        self._check_compiled(outputs)
        return outputs

    def _call_stored(self, inputs: dict[str, Any], dynamic: bool) -> Any:
        assert self.store is not None
        try:
            key = stored_compile.fingerprint(self.forward, inputs, self.token_inputs, dynamic, type(self.backend).__qualname__)
        except stored_compile.UndescribableError as exc:  # a key without that value could match another forward
            logger.warning("graphhal: not storing the compiled forward: %s; compiling it without a store", exc)
            self.store = None
            return self(**inputs)
        stored = self.store.load(key)
        if stored is not None:
            try:
                outputs = stored(self.forward, **inputs)
            except Exception as exc:  # traced from something the fingerprint missed: compile afresh, store over it
                logger.warning(
                    "graphhal: the stored compile %s failed on its first call (%s: %s); compiling again",
                    self.store.path(key), type(exc).__name__, exc,
                )
            else:
                self.loaded, self._stored = True, stored
                return outputs
        try:
            stored = self._guarded(lambda: self._aot_compile(inputs, dynamic))
        except GraphHalError:
            raise  # the forward's own problem (a token specialisation): compiling without a store would hit it too
        except Exception as exc:  # a store must never stop a server: compile the ordinary way instead
            logger.warning(
                "graphhal: could not compile the forward for storing (%s: %s); compiling it without a store",
                type(exc).__name__, exc,
            )
            self.store = None
            self.backend.compile_count = 0  # nothing of that compile is used: the next one is the first
            return self(**inputs)
        outputs = stored(self.forward, **inputs)
        self._check_compiled(outputs)
        self.store.save(key, stored)
        self._stored = stored
        return outputs

    def _aot_compile(self, inputs: dict[str, Any], dynamic: bool) -> Any:
        """``forward`` traced and compiled whole, as a function of the forward and its inputs, for storing.

        The forward is an argument, not a closure, so that the stored code reads the weights (and the KV
        cache) from whatever forward it is handed in the next process; and no guard is kept (``_no_guards``)."""
        self.backend.storing = True
        try:
            with torch._dynamo.config.patch(enable_aot_compile=True):  # read by torch.compile: adds aot_compile
                compiled = torch.compile(
                    _stored_entry, backend=self.backend, fullgraph=True, dynamic=False, **_guard_filter(_no_guards)
                )
                if not dynamic:
                    return compiled.aot_compile(((self.forward,), inputs))
                for name in self.token_inputs:
                    torch._dynamo.mark_dynamic(inputs[name], 0)
                with _backed_size_oblivious():
                    return compiled.aot_compile(((self.forward,), inputs))
        finally:
            self.backend.storing = False

    def _check_compiled(self, outputs: Any) -> None:
        """After the first compile: that the backend was called (it found a graph) at all."""
        if self.backend.compile_count:
            return
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

    def _call_compiled(self, inputs: dict[str, Any]) -> Any:
        compiled = self._compiled if _guard_filters() else self._unguarded()
        return self._guarded(lambda: compiled(**inputs))

    def _unguarded(self) -> Callable[..., Any]:
        """Before torch 2.8 (no ``guard_filter_fn``): the code Dynamo compiled, called directly, so no guard runs.

        The shape guards cannot be dropped there, and the compile's own one (the token count is at least 2:
        torch 2.6 specialises sizes 0 and 1, with no ``backed_size_oblivious`` to stop it) would fail for a
        bucket of one token and compile again. So every guard is skipped, as vLLM's dispatcher did on those
        versions: Dynamo's rewritten bytecode of the entry, run as a function outside torch.compile. The
        runner's input checks stand in for the guards, as they do for the shape guards on newer torch; what
        is lost there is a recompile on a changed global or module attribute. While Dynamo holds no compiled
        code for the entry (before the first compile, or after ``torch._dynamo.reset()``), the compiling
        function is called, so a reset still ends in a RecompileError."""
        entries = _debug_cache_entries(self._entry.__code__)
        if not entries:
            return self._compiled
        code = entries[0].code
        if self._direct is None or self._direct[0] is not code:
            entry = self._entry
            self._direct = code, types.FunctionType(code, entry.__globals__, code.co_name, None, entry.__closure__)
        return self._direct[1]

    def _guarded(self, compile_or_call: Callable[[], Any]) -> Any:
        """``compile_or_call()``, with torch.compile's errors turned into what graphhal users can act on."""
        from torch.fx.experimental.symbolic_shapes import ConstraintViolationError

        try:
            return compile_or_call()
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


@functools.cache
def _guard_filters() -> bool:
    """Whether torch.compile takes a ``guard_filter_fn`` (torch 2.8 on). Before, it hands ``options`` to a
    backend other than Inductor as a keyword the backend does not take, and no guard can be dropped
    (``CompiledForward._unguarded`` says what graphhal does there instead). Asked on first use: importing
    Dynamo at hal's import would import Triton before the tests can set TRITON_INTERPRET (torch 2.6)."""
    return "guard_filter_fn" in inspect.signature(torch._dynamo.eval_frame._optimize).parameters


def _guard_filter(guard_filter_fn: Callable[[list[Any]], list[bool]]) -> dict[str, Any]:
    """torch.compile's keyword for ``guard_filter_fn``, where torch has it (see ``_guard_filters``)."""
    return {"options": {"guard_filter_fn": guard_filter_fn}} if _guard_filters() else {}


def _backed_size_oblivious() -> contextlib.AbstractContextManager[Any]:
    """Size-oblivious reasoning for the marked (backed) token dimension: no guard that it is not 0 or 1.

    torch 2.7 added the switch; torch 2.6 specialises 0 and 1 regardless, and ``_unguarded`` skips the
    guard that leaves."""
    if hasattr(fx_config, "backed_size_oblivious"):
        return fx_config.patch(backed_size_oblivious=True)
    return contextlib.nullcontext()


def _fresh_entry(forward: Callable[..., Any]) -> Callable[..., Any]:
    """A new function with a code object of its own that calls ``forward`` (see ``CompiledForward``)."""

    def compiled_forward(**inputs: Any) -> Any:
        return forward(**inputs)

    code = compiled_forward.__code__.replace()  # a distinct code object: Dynamo's cache starts empty
    return types.FunctionType(
        code, compiled_forward.__globals__, code.co_name, compiled_forward.__defaults__, compiled_forward.__closure__
    )


def _stored_entry(forward: Callable[..., Any], **inputs: Any) -> Any:
    """What a stored compile traces: the forward is an input, read anew from whatever forward is passed."""
    return forward(**inputs)


def _no_guards(entries: list[Any]) -> list[bool]:
    """A stored compile keeps no guard: most name objects of the process that traced it (see CompiledForward)."""
    return [False] * len(entries)


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
