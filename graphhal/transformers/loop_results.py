"""What a generation loop step hands out (``StepResult``), how a request that a failed run dropped is reported
(``RequestFailedError``), and one run's tokens on their way to the host (``Reads``)."""

from __future__ import annotations

from typing import Any, Hashable

import hal
from graphhal.transformers.loop_requests import Request


class RequestFailedError(hal.GraphHalError, RuntimeError):
    """A request the loop dropped because the run of a step it was in failed; its blocks are back in the cache.

    ``request_id`` names it, ``phase`` is ``"prefill"``, ``"decode"``, ``"draft"`` or ``"verify"``, ``batch`` lists every request of
    that run (all failed with it), and ``__cause__`` is the run's exception."""

    def __init__(self, request_id: Hashable, phase: str, batch: list[Hashable], cause: BaseException) -> None:
        others = [other for other in batch if other != request_id]
        shown = ", ".join(repr(other) for other in others[:8]) + (", ..." if len(others) > 8 else "")
        beside = f" ({len(others)} other request(s) of that run failed with it: {shown})" if others else ""
        super().__init__(f"request {request_id!r} failed: the {phase} run it was in raised {type(cause).__name__}: {cause}{beside}")
        self.request_id, self.phase, self.batch = request_id, phase, batch


class StepResult(dict):
    """What a step handed out: the requests that finished, ``{request_id: generated tokens}`` (the dict
    itself); ``tokens``, ``{request_id: [tokens read back in this step]}`` for streaming; ``logprobs``, the
    same for the requests that asked for log-probabilities; and ``failed``, ``{request_id:
    RequestFailedError}``: the requests dropped because a run they were in failed. A server answers all of
    them; a failed request never finishes."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens: dict[Hashable, list[int]] = {}
        self.logprobs: dict[Hashable, list[float]] = {}
        self.failed: dict[Hashable, RequestFailedError] = {}


class Reads:
    """One run's sampled tokens on their way to the host, and which request each row belongs to."""

    def __init__(self, phase: str, rows: list[tuple[Request, int]], copy: Any) -> None:
        self.phase, self.rows, self.copy = phase, rows, copy
