"""Host values baked into a graph, named: a debug switch of the cpu reference device.

A device graph replays the numbers its ops were launched with: a Python float (a temperature, a scale read
from a config the server changes), an int taken from a live batch, a scalar tensor made from either, is a
constant of the graph from then on. DESIGN.md says sampling parameters must be slots for that reason. With
``GRAPHHAL_REPORT_BAKED_VALUES=1`` (read when a capture begins), the cpu device's recorder names every Python
number that reaches a recorded op, with the op, the argument, the value and the line of the program that
issued it, logs them once per graph (WARNING) and keeps them on the graph (``RecordedGraph.baked_values``).

Arguments that are a graph's structure rather than its data are left out: lists (shapes, strides, sizes) and
the flags named in ``STRUCTURAL``. Whatever is left is for a person to read: a constant scale is fine, a
temperature is not.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

REPORT_ENV = "GRAPHHAL_REPORT_BAKED_VALUES"
# Arguments that say how an op works, not what it computes with.
STRUCTURAL = frozenset(
    {"dim", "keepdim", "dtype", "layout", "device", "pin_memory", "memory_format", "non_blocking", "copy",
     "correction_mode", "approximate", "reduction", "ceil_mode", "align_corners", "half_to_float", "sorted",
     "largest", "stable", "descending", "implicit", "upper", "unbiased", "is_causal", "enable_gqa"}
)
# Frames of these files are graphhal's or torch's own machinery, not where a value came from.
_MACHINERY = tuple(
    os.sep + os.path.join(*parts) for parts in
    (("torch", ""), ("devices", "cpu", ""), ("hal", ""), ("runners", ""), ("contextlib.py",), ("functools.py",))
)


@dataclass(frozen=True)
class BakedValue:
    """One Python number a recorded op was launched with."""

    op: str  # aten.div.Tensor
    argument: str  # its name in the op's schema
    value: Any
    source: str  # file:line (function) of the program line that issued the op

    def __str__(self) -> str:
        return f"{self.op}({self.argument}={self.value!r}) from {self.source}"


def enabled() -> bool:
    return os.environ.get(REPORT_ENV, "") not in ("", "0")


def baked_in(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[BakedValue]:
    """The Python numbers among ``func``'s arguments (structure left out), with where the call came from."""
    found = []
    for position, argument in enumerate(func._schema.arguments):
        if argument.name in STRUCTURAL:
            continue
        value = args[position] if position < len(args) else kwargs.get(argument.name)
        if isinstance(value, (bool, int, float, complex)) and not isinstance(value, torch.SymInt):
            found.append((argument.name, value))
    if not found:
        return []
    source = _program_line()
    return [BakedValue(str(func), name, value, source) for name, value in found]


def report(graph_name: str, values: list[BakedValue]) -> None:
    if values:
        logger.warning(
            "graphhal %s: %d host value(s) baked into the graph as constants (each replay reuses them): %s",
            graph_name, len(values), "; ".join(map(str, values)),
        )


def _program_line() -> str:
    for frame in reversed(traceback.extract_stack(sys._getframe(2))):
        if not any(part in frame.filename for part in _MACHINERY):
            return f"{frame.filename}:{frame.lineno} ({frame.name})"
    return "(unknown)"
