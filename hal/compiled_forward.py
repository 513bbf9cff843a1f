"""A forward compiled once for every bucket: torch.compile with the token (batch) dimension dynamic.

Used for piecewise capture (with ``PiecewiseBackend``) and for ``compiler: inductor`` in full and breakable
modes (with ``InductorBackend``): either way one compile serves every bucket, and graphhal captures it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.fx.experimental._config as fx_config

from hal.errors import GraphHalError


class InductorBackend:
    """Inductor, without its own CUDA graphs (graphhal captures the compiled forward), counting compiles."""

    def __init__(self) -> None:
        self.compile_count = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        from torch._inductor.compile_fx import compile_fx

        self.compile_count += 1
        return compile_fx(gm, example_inputs)


class CompiledForward:
    """``forward`` compiled with ``backend`` (anything with a ``compile_count``); call it like ``forward``.

    The first call compiles, with dim 0 of every tensor named in ``token_inputs`` marked dynamic and
    size-oblivious (unless that first call has a single token): without that, Dynamo would specialise on the first size and on sizes 0 and 1, and
    compile again for other buckets (a bucket of one token is common in decode). Later calls go straight
    to the compiled code; a recompile is counted by the backend, and ``fullgraph`` turns graph breaks (which
    would hide ops from the split) into errors.
    """

    def __init__(self, forward: Callable[..., Any], backend: Any, token_inputs: Iterable[str]) -> None:
        self.forward = forward
        self.backend = backend
        self.token_inputs = tuple(token_inputs)
        self._compiled = torch.compile(
            forward, backend=backend, fullgraph=True, dynamic=False, options={"guard_filter_fn": _drop_shape_guards}
        )

    def __call__(self, **inputs: Any) -> Any:
        if self.backend.compile_count:
            return self._compiled(**inputs)
        if all(inputs[name].shape[0] == 1 for name in self.token_inputs):
            # Runners compile at their largest bucket, so a first call with one token means one bucket of
            # one token: a static compile serves it (and a symbol hinted at 1 trips Inductor's lowering).
            outputs = self._compiled(**inputs)
        else:
            for name in self.token_inputs:
                torch._dynamo.mark_dynamic(inputs[name], 0)
            with fx_config.patch(backed_size_oblivious=True):
                outputs = self._compiled(**inputs)
        if not self.backend.compile_count:
            raise GraphHalError(
                "torch.compile ran the forward without calling its backend (its recompile limit for "
                "this code may be exhausted, or compilation is disabled), so nothing would be captured"
            )
        return outputs


def _drop_shape_guards(entries: list[Any]) -> list[bool]:
    """Keep every guard but the symbolic-shape ones.

    Tracing a reshape makes Dynamo guard that the token count is not 1 (a view's strides differ at size 1),
    so a decode bucket of one token would compile a second graph. The traced graph itself is shape-generic,
    and the runner checks every input's dtype, shape and row count before calling, so the shape guards
    protect nothing here (vLLM drops guards for the same reason). Tensor, module and global guards stay.
    """
    return [entry.guard_type != "SHAPE_ENV" for entry in entries]
