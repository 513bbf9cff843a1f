"""The overloads a user means when they name an op: an overload, a packet (all of its overloads), or a
``torch.library.custom_op`` object."""

from __future__ import annotations

from typing import Any

import torch


class NotAnOpError(TypeError):
    """What was named is not a torch operator."""


def overloads_of(op: Any) -> list[torch._ops.OpOverload]:
    if isinstance(op, torch._ops.OpOverload):
        return [op]
    if isinstance(op, torch._ops.OpOverloadPacket):
        return [getattr(op, name) for name in op.overloads()]
    custom_op = getattr(op, "_opoverload", None)  # a torch.library.custom_op object
    if isinstance(custom_op, torch._ops.OpOverload):
        return [custom_op]
    raise NotAnOpError(f"{op!r} is not a torch operator (pass torch.ops.<namespace>.<name> or its .default overload)")


def op_name(op: torch._ops.OpOverload) -> str:
    """``namespace::name`` (with ``.overload`` unless it is the default), as logs and errors spell an op."""
    return op._schema.name + ("" if op._overloadname == "default" else f".{op._overloadname}")
