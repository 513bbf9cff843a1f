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
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from hal.capture_state import current_capture
from hal.errors import UnsupportedModeError
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
    """A declared op (or a required break point) the forward reached, and what it allows on this device.

    in_break_point: every call reached was a break point or inside one (so mode ``breakable`` runs it eagerly
    between segments); False when some call was reached outside any (``breakable`` would capture it).
    """

    name: str
    support: GraphSupport
    in_break_point: bool = False

    def describe(self) -> str:
        return f"{self.name} ({self.support})"


class _Probe(TorchDispatchMode):
    """Records every declared op the dispatcher sees; lets every op run as usual."""

    def __init__(self, device_type: str, found: dict[str, ReachedOp]) -> None:
        super().__init__()
        self.device_type = device_type
        self.found = found

    @classmethod
    def is_infra_mode(cls) -> bool:
        # torch 2.10 and earlier tell Dynamo about non-infra modes through one flag of the process, which each
        # mode saves on entry and restores on exit, from any thread: runners choosing their mode in several
        # threads at once can leave it set, and torch.compile then skips every frame in the process. An infra
        # mode stays off that flag (all the word means to those versions). torch 2.11 asks the thread's own
        # stack (inline_torch_dispatch_torch_compile), where the probe stays what it is.
        return not getattr(torch._dynamo.config, "inline_torch_dispatch_torch_compile", False)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        support = graph_support_of(func, self.device_type)
        if support is not None:
            _note(op_name(func), support, in_break_point=getattr(_probe_state, "break_depth", 0) > 0)
        return func(*args, **(kwargs or {}))


_probe_state = threading.local()


def _note(name: str, support: GraphSupport, *, in_break_point: bool) -> None:
    found = _probe_state.found
    earlier = found.get(name)
    found[name] = ReachedOp(name, support, in_break_point and (earlier is None or earlier.in_break_point))


def note_break_point(name: str, support: GraphSupport) -> None:
    """Called by a break point outside any capture: while ``ops_reached`` probes, it is one of the answers."""
    if probing():
        _note(name, support, in_break_point=True)


def probing() -> bool:
    return getattr(_probe_state, "found", None) is not None


@contextmanager
def probing_inside_break_point() -> Iterator[None]:
    """Called by a break point while ``ops_reached`` probes: ops reached inside run eagerly in mode breakable."""
    _probe_state.break_depth = getattr(_probe_state, "break_depth", 0) + 1
    try:
        yield
    finally:
        _probe_state.break_depth -= 1


@contextmanager
def _probing(found: dict[str, ReachedOp]) -> Iterator[None]:
    previous = getattr(_probe_state, "found", None)
    _probe_state.found = found
    try:
        yield
    finally:
        _probe_state.found = previous


def ops_reached(forward: Callable[..., Any], inputs: dict[str, torch.Tensor], device_type: str) -> list[ReachedOp]:
    """Run ``forward(**inputs)`` once eagerly and return the declared ops and required break points it reached,
    with what each allows on ``device_type``; the most restrictive first."""
    found: dict[str, ReachedOp] = {}
    with _probing(found), _Probe(device_type, found), torch.no_grad():
        forward(**inputs)
    order = list(GraphSupport)
    return sorted(found.values(), key=lambda op: (-order.index(op.support), op.name))


def blocking(reached: Iterable[ReachedOp], batch: BatchKind) -> list[ReachedOp]:
    """The ops among ``reached`` that cannot be captured inline in ``batch``es."""
    return [op for op in reached if not op.support.allows(batch)]


class OpNotCapturableError(UnsupportedModeError):
    """An op that declared it cannot be captured in a runner's batches was asked to be (mode ``full``), or
    was reached inside a capture."""


class _CaptureGuard(TorchFunctionMode):
    """Inside a capture, refuses a declared op that cannot be captured in ``batch``es on ``device_type``.

    What a required break point does for itself (it raises when reached inside a graph that cannot break), done
    for declared ops, which are plain torch ops and cannot check themselves: ``ops_reached`` sees only what one
    eager run reaches, and an op chosen at another batch size would otherwise be captured inline, stale or
    failing on a GPU. Ops running eagerly between segments (a breakable capture's breaks) pass: no capture is
    active there. A torch function mode rather than a dispatch mode: it sees an op where the model calls it,
    whatever dispatch modes a device's capture session stacks and unstacks meanwhile (the cpu recorder's,
    entered and left per segment of a breakable capture), and a recorder that runs a custom op's kernel below
    the Python key hides the op from dispatch modes outside it.
    """

    def __init__(self, device_type: str, batch: BatchKind) -> None:
        super().__init__()
        self.device_type = device_type
        self.batch = batch

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        support = _support_of_called(func, self.device_type)
        if support is not None and not support.allows(self.batch):
            active = current_capture()
            if active is not None:
                raise OpNotCapturableError(
                    f"op {op_name(func)} ({support}) was reached while capturing a '{active.mode}' graph on "
                    f"{active.device}, but it declared that it cannot be captured in {self.batch} batches there "
                    "(hal.declare_graph_support). Register it as a splitting op (hal.register_splitting_op) and use "
                    "mode 'piecewise', or call it inside a hal.break_point and use mode 'breakable'."
                )
        return func(*args, **(kwargs or {}))


@contextmanager
def refusing_uncapturable_ops(device_type: str, batch: BatchKind) -> Iterator[None]:
    """For the block: a declared op reached inside a capture that cannot be captured in ``batch``es raises
    ``OpNotCapturableError``. Costs a Python call per torch function call, so it is entered only where some op
    declared such a limit on ``device_type``; and never around a torch.compile'd callable (Dynamo runs a frame
    eagerly under such a mode: the compiled code would not be what is captured)."""
    if not any(not support.allows(batch) for support in _declared_on(device_type)):
        yield
        return
    with _CaptureGuard(device_type, batch):
        yield


def _support_of_called(func: Any, device_type: str) -> GraphSupport | None:
    """What a called op declared: an overload, or a packet called directly (every overload of a packet is
    declared alike by ``declare_graph_support``); None for anything else a function mode sees."""
    if isinstance(func, torch._ops.OpOverloadPacket):
        func = next((getattr(func, name) for name in func.overloads()), None)
    if not isinstance(func, torch._ops.OpOverload):
        return None
    return graph_support_of(func, device_type)


def _declared_on(device_type: str) -> list[GraphSupport]:
    return [support for op in _declared if (support := graph_support_of(op, device_type)) is not None]
