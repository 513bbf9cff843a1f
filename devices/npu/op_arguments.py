"""The arguments of an op call as a dispatch mode sees them: read one by name, or replace one.

A dispatch mode receives positional schema arguments in ``args`` and keyword-only ones in ``kwargs``, and a
keyword-only argument only when it differs from its default (trailing positional defaults are dropped too;
torch/_ops.py). So an argument is looked up by name in ``kwargs`` first, then by its schema position.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from devices.npu.host_length_ops import HostLengthUpdateError

_ABSENT = object()


def _position(func: torch._ops.OpOverload, name: str) -> int:
    for position, argument in enumerate(func._schema.arguments):
        if argument.name == name:
            return position
    raise HostLengthUpdateError(f"{func} has no argument {name!r}; its schema: {func._schema}")


def argument_value(func: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any], name: str) -> Any:
    """Argument ``name`` of the call; HostLengthUpdateError when the call did not pass it."""
    value = passed_value(func, args, kwargs, name, _ABSENT)
    if value is _ABSENT:
        raise HostLengthUpdateError(
            f"{func} was called without {name!r}: its lengths are unknown, so it cannot be updated"
        )
    return value


def passed_value(
    func: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any], name: str, absent: Any = None
) -> Any:
    """Argument ``name`` of the call, or ``absent`` when the call did not pass it (its default applies)."""
    if name in kwargs:
        return kwargs[name]
    position = _position(func, name)
    return args[position] if position < len(args) else absent


def with_argument(
    func: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any], name: str, value: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``args``/``kwargs`` with argument ``name`` replaced by ``value``."""
    if name in kwargs:
        return tuple(args), {**kwargs, name: value}
    position = _position(func, name)
    if position >= len(args):  # not passed: a keyword-only argument (or a dropped trailing default)
        return tuple(args), {**kwargs, name: value}
    return (*args[:position], value, *args[position + 1 :]), dict(kwargs)
