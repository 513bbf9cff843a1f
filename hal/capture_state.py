"""Which capture, if any, this thread is inside: what a break point asks when it is called."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Protocol


class SegmentCutter(Protocol):
    """A capture that can end its segment at a break point and run the break eagerly (a breakable capture)."""

    def cut(self, point: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any: ...


_state = threading.local()


@dataclass(frozen=True)
class ActiveCapture:
    device: str
    mode: str
    cutter: SegmentCutter | None = None  # set when break points can cut the capture here


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
