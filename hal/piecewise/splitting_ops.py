"""Splitting ops: the custom ops a piecewise graph runs eagerly between its captured pieces.

    hal.register_splitting_op(torch.ops.mylib.paged_attention.default)

A splitting op must write its result into a tensor its caller allocated and passed in (vLLM's
``_with_output`` convention) and return nothing. The piece before the op allocates that tensor inside its
captured graph, so the tensor sits at one pool address for every replay, and the piece after reads it there.
An op that returned a fresh tensor would hand the next piece a new address on every call while the piece's
graph keeps reading the address it was captured with: silently stale results (vLLM issue 37363). Such an op
is refused here, at registration, and again when a compiled graph is split.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from hal.errors import GraphHalError
from hal.op_overloads import NotAnOpError, overloads_of


class SplittingOpError(GraphHalError, ValueError):
    """An op cannot serve as a splitting op (not a custom op, or it returns a fresh tensor)."""


_registered: set[torch._ops.OpOverload] = set()


def _overloads(op: Any) -> list[torch._ops.OpOverload]:
    try:
        return overloads_of(op)
    except NotAnOpError as exc:
        raise SplittingOpError(
            f"{exc}; a splitting op must be a custom op registered with torch.library so that torch.compile "
            "keeps it as one node"
        ) from None


def check_writes_into_output(op: torch._ops.OpOverload) -> None:
    """Raise ``SplittingOpError`` unless ``op`` returns nothing and mutates at least one argument."""
    schema = op._schema
    written = [arg.name for arg in schema.arguments if arg.alias_info is not None and arg.alias_info.is_write]
    if schema.returns or not written:
        returns = ", ".join(str(r.type) for r in schema.returns) or "nothing"
        raise SplittingOpError(
            f"{op} cannot be a splitting op: it returns {returns} and writes into "
            f"{', '.join(written) or 'no argument'}. A splitting op must write its result into an output tensor "
            "its caller allocates and passes in, and return nothing (vLLM's _with_output convention): a fresh "
            "result tensor gets a new address on every call, and the captured piece after the op would keep "
            "reading the old one. Declare the op with mutates_args=('out',) and return None."
        )


def register_splitting_op(op: Any) -> None:
    """Make every piecewise compile split its graph at ``op`` (all overloads of a packet)."""
    overloads = _overloads(op)
    for overload in overloads:
        check_writes_into_output(overload)
    _registered.update(overloads)


def unregister_splitting_op(op: Any) -> None:
    for overload in _overloads(op):
        _registered.discard(overload)


def registered_splitting_ops() -> frozenset[torch._ops.OpOverload]:
    return frozenset(_registered)


def resolve_splitting_ops(ops: Iterable[Any] | None) -> frozenset[torch._ops.OpOverload]:
    """The given ops (checked), or every registered one when ``ops`` is None."""
    if ops is None:
        return registered_splitting_ops()
    resolved = [overload for op in ops for overload in _overloads(op)]
    for overload in resolved:
        check_writes_into_output(overload)
    return frozenset(resolved)
