"""How far an op can be captured in a device graph, as the op declares it, and which such ops a forward reaches.

    hal.declare_graph_support(torch.ops.mylib.paged_attention.default, hal.GraphSupport.ANY_BATCH)
    hal.declare_graph_support(torch.ops.mylib.fa_decode.default, hal.GraphSupport.UNIFORM_DECODE)
    hal.declare_graph_support(torch.ops.mylib.varlen_attention.default, hal.GraphSupport.NEVER, device_types=["npu"])

An attention kernel knows what its launch bakes in; the runner does not. A kernel that reads every length and
block table from device memory can be captured for any batch; one whose launch is shaped by decode batches
(one new token per request) only for those; one that reads lengths on the host never. The runners ask before
they capture (``ops_reached`` runs the forward once eagerly and lists the declared ops it reaches) and pick a
mode from the answers: mode ``auto`` takes ``full`` where every op allows it, and asking for ``full`` over an op
that cannot be captured is an error naming the op. vLLM's attention backends declare the same thing
(``AttentionCGSupport``); here any op or break point can, per device type.

An op that declares nothing adds no constraint (plain tensor ops are capturable), except a break point marked
``required``: it cannot be captured anywhere.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hal.op_overloads import op_name, overloads_of


class GraphSupport(str, Enum):
    """How far an op can be captured inline in a device graph (a ``str`` enum: logs and JSON keep the name).

    ANY_BATCH       in any batch: decode, prefill, or both mixed (its launch reads everything from device memory)
    UNIFORM_DECODE  only in batches of one new token per request (decode runners); prefill must run it eagerly
    NEVER           in no graph: it runs eagerly between captured pieces or segments (piecewise, breakable)
    """

    ANY_BATCH = "any_batch"
    UNIFORM_DECODE = "uniform_decode"
    NEVER = "never"

    __str__ = str.__str__
    __format__ = str.__format__
    __hash__ = str.__hash__

    def allows(self, batch: "BatchKind") -> bool:
        if self is GraphSupport.ANY_BATCH:
            return True
        return self is GraphSupport.UNIFORM_DECODE and batch is BatchKind.UNIFORM_DECODE


class BatchKind(str, Enum):
    """What the batches a runner captures look like: what an op's ``GraphSupport`` is checked against."""

    UNIFORM_DECODE = "uniform decode"  # one new token per request (DecodeRunner)
    MIXED = "mixed"  # any number of new tokens per request, prefill chunks and decodes together (PrefillRunner)

    __str__ = str.__str__
    __format__ = str.__format__


_ALL_DEVICES = "*"
# op -> {device type or "*": support}
_declared: dict[torch._ops.OpOverload, dict[str, GraphSupport]] = {}


def declare_graph_support(op: Any, support: GraphSupport | str, *, device_types: Iterable[str] | None = None) -> None:
    """Declare how far ``op`` (every overload of a packet) can be captured: on ``device_types``, or on every
    device type when None (a per-device declaration wins over the all-devices one)."""
    support = GraphSupport(support)
    if isinstance(device_types, str):
        raise TypeError(f"device_types takes a list of device type names, got the string {device_types!r}")
    keys = [_ALL_DEVICES] if device_types is None else list(device_types)
    for overload in overloads_of(op):
        per_device = _declared.setdefault(overload, {})
        for key in keys:
            per_device[key] = support


def graph_support_of(op: torch._ops.OpOverload, device_type: str) -> GraphSupport | None:
    """What ``op`` declared for ``device_type`` (or for every device), or None when it declared nothing."""
    per_device = _declared.get(op)
    if per_device is None:
        return None
    return per_device.get(device_type, per_device.get(_ALL_DEVICES))


@dataclass(frozen=True)
class ReachedOp:
    """A declared op (or a required break point) the forward reached, and what it allows on this device."""

    name: str
    support: GraphSupport

    def describe(self) -> str:
        return f"{self.name} ({self.support})"


class _Probe(TorchDispatchMode):
    """Records every declared op the dispatcher sees; lets every op run as usual."""

    def __init__(self, device_type: str, found: dict[str, GraphSupport]) -> None:
        super().__init__()
        self.device_type = device_type
        self.found = found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        support = graph_support_of(func, self.device_type)
        if support is not None:
            self.found[op_name(func)] = support
        return func(*args, **(kwargs or {}))


_probe_state = threading.local()


def note_break_point(name: str, support: GraphSupport) -> None:
    """Called by a break point outside any capture: while ``ops_reached`` probes, it is one of the answers."""
    found = getattr(_probe_state, "found", None)
    if found is not None:
        found.setdefault(name, support)


def probing() -> bool:
    return getattr(_probe_state, "found", None) is not None


@contextmanager
def _probing(found: dict[str, GraphSupport]) -> Iterator[None]:
    previous = getattr(_probe_state, "found", None)
    _probe_state.found = found
    try:
        yield
    finally:
        _probe_state.found = previous


def ops_reached(forward: Callable[..., Any], inputs: dict[str, torch.Tensor], device_type: str) -> list[ReachedOp]:
    """Run ``forward(**inputs)`` once eagerly and return the declared ops and required break points it reached,
    with what each allows on ``device_type``; the most restrictive first."""
    found: dict[str, GraphSupport] = {}
    with _probing(found), _Probe(device_type, found), torch.no_grad():
        forward(**inputs)
    order = list(GraphSupport)
    reached = [ReachedOp(name, support) for name, support in found.items()]
    return sorted(reached, key=lambda op: (-order.index(op.support), op.name))


def blocking(reached: Iterable[ReachedOp], batch: BatchKind) -> list[ReachedOp]:
    """The ops among ``reached`` that cannot be captured inline in ``batch``es."""
    return [op for op in reached if not op.support.allows(batch)]
