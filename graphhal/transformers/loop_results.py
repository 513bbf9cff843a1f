"""What a generation loop step hands out (``StepResult``), how a request that a failed run dropped is reported
(``RequestFailedError``), one run's tokens on their way to the host (``Reads``), and who hands them to their
requests (``Handout``)."""

from __future__ import annotations

import logging
from typing import Any, Callable, Hashable

import hal
from graphhal.transformers.loop_requests import Request

logger = logging.getLogger(__name__)


class RequestFailedError(hal.GraphHalError, RuntimeError):
    """A request the loop dropped because the run of a step it was in failed; its blocks are back in the cache.

    ``request_id`` names it, ``phase`` is ``"prefill"``, ``"decode"`` or ``"verify"`` (a drafter that fails costs
    drafts, not requests), ``batch`` lists every request of that run (all failed with it), and ``__cause__`` is
    the run's exception."""

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


class Handout:
    """Hands tokens read back to their requests and to the step's ``StepResult``, ending the requests they end
    (``finish`` takes one out of the loop); fails every request of a run that failed."""

    def __init__(self, eos_token_ids: frozenset[int], finish: Callable[[Request], None]) -> None:
        self.eos_token_ids, self.finish = eos_token_ids, finish

    def read(self, reads: Reads, result: StepResult) -> None:
        """Hand out one run's tokens, now on the host. On CUDA an error inside the run surfaces here, when its
        copy is waited on: it fails the run's requests."""
        try:
            host = reads.copy.wait()
            tokens, logprobs = host["tokens"].tolist(), host["logprobs"].tolist()
        except Exception as error:
            self.fail(reads.phase, [request for request, _ in reads.rows if request.running], error, result)
            return
        for request, row in reads.rows:
            if request.running:  # else ended (or aborted) while this run was queued: its token is discarded
                self.token(request, tokens[row], logprobs[row], result)

    def token(self, request: Request, token: int, logprob: float | None, result: StepResult) -> None:
        request.generated.append(token)
        result.tokens.setdefault(request.request_id, []).append(token)
        if request.wants_logprobs:
            result.logprobs.setdefault(request.request_id, []).append(logprob)
        if request.ended_by(token, self.eos_token_ids):
            self.finish(request)
            result[request.request_id] = request.generated

    def tokens(self, request: Request, tokens: list[int], result: StepResult) -> None:
        """A run of tokens read back together (a verify step's accepted drafts, then its own token), handed out
        in order: the request ends at the first token that ends it, and the rest of the run is dropped. A run
        that cannot end it (no end-of-sequence token, no stop sequence, room left) is handed out at once."""
        if (
            not request.stop and not request.wants_logprobs and len(request.generated) + len(tokens) < request.max_new_tokens
            and self.eos_token_ids.isdisjoint(tokens)
        ):
            request.generated.extend(tokens)
            result.tokens.setdefault(request.request_id, []).extend(tokens)
            return
        for token in tokens:
            if request.running:
                self.token(request, token, None, result)

    def fail(self, phase: str, requests: list[Request], error: BaseException, result: StepResult) -> None:
        """A run's exception cannot be pinned on one of its requests (what one request can get wrong, ``add``
        refused): every request in it fails."""
        batch = [request.request_id for request in requests]
        for request in requests:
            failure = RequestFailedError(request.request_id, phase, batch, error)
            failure.__cause__ = error
            logger.error("graphhal: %s", failure)
            self.finish(request)
            result.failed[request.request_id] = failure
