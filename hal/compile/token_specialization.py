"""Saying where model code fixes the token dimension that one compile must keep symbolic.

``CompiledForward`` marks the token (batch) dimension dynamic so that one compile serves every bucket. Model
code that ties that dimension to a constant (a buffer with one row per bucket slot, a Python int taken from
the batch and used as a size) makes torch.compile specialise it, and the compile then serves one size only.
torch reports that as a ``ConstraintViolationError`` naming the input but not the code. The ShapeEnv keeps
where it happened: ``specialization_stacks`` holds the traced user frames of each specialised input, and a
specialisation while graphhal itself runs the traced graph shows in the FX node's ``stack_trace``. This
module turns either into a ``TokenSpecializationError`` naming the file and line and the modes that work.
"""

from __future__ import annotations

import re
import traceback
from typing import Any

from hal.errors import GraphHalError

WORKING_MODES = (
    "capture it in mode 'full' (decode) or 'breakable', with the default compiler: they record the forward "
    "per bucket as it runs, without torch.compile, so a size fixed in the model does no harm"
)


class TokenSpecializationError(GraphHalError, RuntimeError):
    """Model code fixed the token dimension to a constant, so one compile cannot serve every bucket."""


def specialized_value(shape_env: Any, symbol: Any) -> int | None:
    """The constant ``symbol`` was specialised to in ``shape_env``, or None while it is still symbolic."""
    if shape_env is None or symbol is None:
        return None
    replacement = shape_env.replacements.get(symbol)
    return int(replacement) if replacement is not None and replacement.is_number else None


def symbol_inputs(shape_env: Any, symbol: Any) -> str:
    """The inputs whose size ``symbol`` is, as Dynamo names them (``L['input_ids'].size()[0]``)."""
    sources = getattr(shape_env, "var_to_sources", {}).get(symbol, [])
    return ", ".join(_source_name(source) for source in sources) or f"symbol {symbol}"


def traced_specialization(shape_env: Any) -> tuple[str, int | None, str] | None:
    """(input, value, where in the model) of a specialisation Dynamo recorded while tracing, if any."""
    # The traced user frames per specialised input: ``specialization_stacks`` from torch 2.9 on,
    # ``user_specialization_stacks`` in torch 2.8.
    stacks = getattr(shape_env, "specialization_stacks", None) or getattr(shape_env, "user_specialization_stacks", None) or {}
    for source, stack in stacks.items():
        if stack:
            value = None
            for symbol, sources in getattr(shape_env, "var_to_sources", {}).items():
                if source in sources:
                    value = specialized_value(shape_env, symbol)
            return _source_name(source), value, describe_frame(stack[-1])
    if stacks:
        return None
    # torch 2.6 and 2.7 keep no stack, only torch's one-line note of the user line where a symbol became a
    # constant (its file name shortened by torch, not always to a path that exists).
    for symbol, sloc in getattr(shape_env, "replacements_slocs", {}).items():
        where = getattr(sloc, "maybe_user_loc", None)
        value = specialized_value(shape_env, symbol)
        if where and value is not None and getattr(shape_env, "var_to_sources", {}).get(symbol):
            return symbol_inputs(shape_env, symbol), value, where
    return None


def _source_name(source: Any) -> str:
    """A Dynamo source's name: a (cached) property from torch 2.10 on, a method before."""
    name = source.name
    return name() if callable(name) else name


def describe_frame(frame: traceback.FrameSummary) -> str:
    code = f": {frame.line.strip()}" if frame.line else ""
    return f"{frame.filename}:{frame.lineno} in {frame.name}{code}"


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<name>\S+)')


def node_location(node: Any) -> str:
    """The model line an FX node was traced from (the last frame of its ``stack_trace``), or the node."""
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    for index in range(len(trace) - 1, -1, -1):
        frame = _FRAME.search(trace[index])
        if frame:
            code = trace[index + 1].strip() if index + 1 < len(trace) else None
            return describe_frame(traceback.FrameSummary(frame["file"], int(frame["line"]), frame["name"], line=code))
    return f"graph node {node.format_node()}"


def token_specialization_error(what: str, value: int | None, where: str) -> TokenSpecializationError:
    to_value = f" to {value}" if value is not None else ""
    return TokenSpecializationError(
        f"the token dimension ({what}) was specialised{to_value} at {where}. Piecewise graphs (and "
        "compiler='inductor') compile the forward once with that dimension symbolic, to serve every bucket; "
        f"code that fixes it to one size cannot be compiled so. Keep the dimension symbolic there, or {WORKING_MODES}."
    )


def from_traced(shape_env: Any) -> TokenSpecializationError | None:
    """The error for a specialisation recorded while Dynamo traced the forward, if there is one."""
    found = traced_specialization(shape_env)
    if found is None:
        return None
    source, value, where = found
    return token_specialization_error(source, value, where)
