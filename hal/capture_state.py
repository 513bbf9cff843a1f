"""Which capture, if any, this thread is inside: what a break point asks when it is called."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from hal.breakable_graph import BreakableCapture

_state = threading.local()


@dataclass(frozen=True)
class ActiveCapture:
    device: str
    mode: str
    breakable: "BreakableCapture | None" = None  # set when breaks can cut the capture here


def current_capture() -> ActiveCapture | None:
    return getattr(_state, "capture", None)


@contextmanager
def capture_scope(active: ActiveCapture | None) -> Iterator[None]:
    """Mark this thread as capturing (or, with None, as running eagerly) for the duration of the block."""
    previous = getattr(_state, "capture", None)
    _state.capture = active
    try:
        yield
    finally:
        _state.capture = previous


@contextmanager
def tracked_session(session: Any, active: ActiveCapture) -> Iterator[Any]:
    with capture_scope(active), session as graph:
        yield graph
