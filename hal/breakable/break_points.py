"""Break points: functions a breakable graph runs eagerly between captured segments.

    @hal.break_point
    def varlen_attention(q, k, v, lens):        # syncs with the host: cannot live inside a graph
        ...

Outside a capture a break point is a plain call. Inside a breakable capture, reaching it ends the current
segment, runs the function eagerly, and opens the next segment; at replay the function runs again between
the segment replays. Inside a full capture, a required break point is an error (the op cannot be captured),
while an optional one (``required=False``: capturable, but worth keeping out of the graph when breaking)
is captured inline; how far the op inside it can be captured is the op's own declaration
(``hal.declare_graph_support``). A disabled break point (``enabled=False``) is always a plain call.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar, overload

import torch

from hal.capture_state import current_capture
from hal.errors import GraphHalError
from hal.graph_support import GraphSupport, note_break_point, probing, probing_inside_break_point

F = TypeVar("F", bound=Callable[..., Any])


class BreakInFullGraphError(GraphHalError, RuntimeError):
    """A required break point was reached while capturing a graph mode that cannot break."""


class BreakPoint:
    """A function wrapped as a break point; call it like the function."""

    def __init__(self, function: Callable[..., Any], *, name: str | None = None, required: bool = True, enabled: bool = True) -> None:
        self.function = function
        qualname = getattr(function, "__qualname__", type(function).__qualname__)
        self.name = name or f"{function.__module__}.{qualname}"
        self.required = required
        self.enabled = enabled
        functools.update_wrapper(self, function, updated=())  # a Module's __dict__ must not be copied over

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            # Traced by torch.compile: the call becomes an ordinary node of the FX graph (where a piecewise
            # backend can split at it); the capture bookkeeping below must not be traced into the graph.
            return self.function(*args, **kwargs)
        active = current_capture()
        if active is None or not self.enabled:
            if self.enabled and probing():  # a runner choosing its mode asks what its forward reaches (ops_reached)
                if self.required:
                    note_break_point(self.name, GraphSupport.NEVER)
                with probing_inside_break_point():  # breakable would run whatever is reached here eagerly
                    return self.function(*args, **kwargs)
            return self.function(*args, **kwargs)
        if active.cutter is not None:
            return active.cutter.cut(self, args, kwargs)
        if self.required:
            raise BreakInFullGraphError(
                f"break point {self.name!r} was reached while capturing a {active.mode!r} graph on {active.device}, "
                "which cannot break: use mode 'breakable' to run it eagerly between captured segments"
            )
        return self.function(*args, **kwargs)

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        """Bind like a function when used on a method (``self`` first)."""
        return self if instance is None else functools.partial(self, instance)

    def __repr__(self) -> str:
        return f"BreakPoint({self.name!r}, required={self.required}, enabled={self.enabled})"


@overload
def break_point(function: F) -> F: ...
@overload
def break_point(*, name: str | None = None, required: bool = True, enabled: bool = True) -> Callable[[F], F]: ...


def break_point(function=None, *, name=None, required=True, enabled=True):  # type: ignore[no-untyped-def]
    """Mark ``function`` as a break point; usable as ``@break_point`` or ``@break_point(required=False)``."""

    def wrap(fn: Callable[..., Any]) -> BreakPoint:
        return BreakPoint(fn, name=name, required=required, enabled=enabled)

    return wrap(function) if function is not None else wrap


def _no_work() -> None:
    return None


# Not required: with nothing to run at the cut, a full capture can simply go on through it.
_FORCED_CUT = BreakPoint(_no_work, name="break_graph()", required=False)


def break_graph() -> None:
    """Cut the current breakable capture here (nothing runs eagerly at the cut); a no-op elsewhere."""
    _FORCED_CUT()
