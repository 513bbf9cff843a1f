"""Greedy generation with continuous batching: a small server loop over a decode and a prefill runner.

    loop = GenerationLoop(decode, prefill, kv_cache, eos_token_ids=model.generation_config.eos_token_id)
    loop.add("a", prompt_ids, max_new_tokens=32)     # TypeError/ValueError for a request it cannot serve
    while not loop.idle:
        result = loop.step()
        for request_id, tokens in result.items():        # the requests that finished in this step
            ...
        for request_id, error in result.failed.items():  # those a failed run dropped (RequestFailedError)
            ...

Each ``step`` does what a serving engine's scheduler does, in three parts:

1. admit waiting requests, first come first served, while the KV cache has blocks for a whole request
   (prompt and every token it may generate: no request is ever preempted) and the batch has room;
2. prefill: pack the prompt tokens not yet cached into one batch of at most the prefill runner's largest
   bucket (a long prompt goes in chunks over several steps, each attending over the chunks before it); a
   request whose prompt is complete takes its first token from its last token's logits;
3. decode: every request with a token to feed runs one decode step together, and takes its next token.

A request finishes after ``max_new_tokens`` tokens or at an end-of-sequence token (kept, as ``generate``
keeps it); its blocks go back to the cache at once, so a waiting request can join in the next step.
Requests can be added between any two steps. Greedy decoding (argmax, first index on ties), as
``generate(do_sample=False)``. Batches are built on the host; the runners copy them into their graphs' inputs.

What one request can get wrong is refused by ``add`` (``graphhal.transformers.request_checks``): ids outside
the vocabulary, more positions than a learned position table embeds, more tokens than the KV cache holds,
arguments of the wrong type. A step whose run fails anyway (a device error, a model's own exception) cannot
say which of its requests caused it: every request in that run fails, its blocks go back, and the step
reports it in ``StepResult.failed``; the loop goes on with every other request.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

import torch

import hal
from graphhal.paged_attention.block_allocator import NULL_BLOCK, OutOfBlocksError
from graphhal.paged_attention.kv_cache import PagedKVCache
from graphhal.transformers import request_checks
from runners import DecodeRunner, PrefillRunner

logger = logging.getLogger(__name__)


def _tokens_cached(prompt_len: int, max_new_tokens: int) -> int:
    """The most tokens a request puts in the cache: its last generated token is never fed back."""
    return prompt_len + max_new_tokens - 1


class RequestFailedError(hal.GraphHalError, RuntimeError):
    """A request the loop dropped because the run of a step it was in failed; its blocks are back in the cache.

    ``request_id`` names it, ``phase`` is ``"prefill"`` or ``"decode"``, ``batch`` lists every request of
    that run (all failed with it), and ``__cause__`` is the run's exception."""

    def __init__(self, request_id: Hashable, phase: str, batch: list[Hashable], cause: BaseException) -> None:
        others = [other for other in batch if other != request_id]
        shown = ", ".join(repr(other) for other in others[:8]) + (", ..." if len(others) > 8 else "")
        beside = f" ({len(others)} other request(s) of that run failed with it: {shown})" if others else ""
        super().__init__(f"request {request_id!r} failed: the {phase} run it was in raised {type(cause).__name__}: {cause}{beside}")
        self.request_id, self.phase, self.batch = request_id, phase, batch


class StepResult(dict):
    """What a step ended: the requests that finished, ``{request_id: generated tokens}`` (the dict itself),
    and ``failed``, ``{request_id: RequestFailedError}``: the requests dropped because a run they were in
    failed. A server answers both; a failed request never finishes."""

    def __init__(self) -> None:
        super().__init__()
        self.failed: dict[Hashable, RequestFailedError] = {}


@dataclass
class _Request:
    request_id: Hashable
    prompt: list[int]
    max_new_tokens: int
    generated: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose keys and values are in the cache

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.prompt)

    def token_at(self, position: int) -> int:
        return self.prompt[position] if position < len(self.prompt) else self.generated[position - len(self.prompt)]


class GenerationLoop:
    """Continuous batching of greedy generation over ``decode`` and ``prefill`` runners sharing ``kv_cache``.

    eos_token_ids:   tokens that end a request (an int, a list, or None for none).
    max_running:     the most requests decoding at once; default the decode runner's largest bucket.
    vocab_size:      token ids a prompt may hold are 0 to ``vocab_size - 1``. Default: read from the model the
                     runners' steps hold (its token embedding's rows), else the KV cache's model config.
    max_positions:   the positions the model embeds (0 to ``max_positions - 1``): a request feeding more is
                     refused. Default: ``max_position_embeddings`` where the model reads positions from a
                     learned table (GPT-2, OPT), no limit where it computes them (rotary); only the KV cache
                     bounds a request then. Give both for a forward that holds no ``model``.
    """

    def __init__(
        self,
        decode: DecodeRunner,
        prefill: PrefillRunner,
        kv_cache: PagedKVCache,
        *,
        eos_token_ids: int | Sequence[int] | None = None,
        max_running: int | None = None,
        vocab_size: int | None = None,
        max_positions: int | None = None,
    ) -> None:
        self.decode, self.prefill, self.kv_cache = decode, prefill, kv_cache
        # Read from the model the runners already hold: a second description of it could disagree with it.
        self.limits = request_checks.token_limits(
            (decode.forward, prefill.forward), kv_cache, vocab_size=vocab_size, max_positions=max_positions
        )
        self.eos_token_ids = frozenset([eos_token_ids] if isinstance(eos_token_ids, int) else eos_token_ids or ())
        self.max_running = max_running or decode.config.max_size
        self.max_chunk_tokens = prefill.config.max_size  # the largest prefill bucket: every chunk replays a graph
        self.max_requests = prefill.config.max_requests
        self.block_size = kv_cache.block_size
        self.max_blocks_per_seq = kv_cache.config.max_blocks_per_seq
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._ids: set[Hashable] = set()
        self._dtypes = {slot.name: slot.dtype for slot in (*decode.slots, *prefill.slots)}

    @property
    def idle(self) -> bool:
        """Nothing waiting and nothing running."""
        return not self._waiting and not self._running

    @property
    def num_waiting(self) -> int:
        """Requests queued for admission (waiting for KV-cache blocks or a place in the batch)."""
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        """Requests admitted: prefilling or decoding, their blocks allocated."""
        return len(self._running)

    def add(self, request_id: Hashable, prompt: Any, max_new_tokens: int) -> None:
        """Queue a request: its prompt token ids and how many tokens to generate at most.

        ``prompt``: a list or tuple of ints, a 1-D integer tensor or numpy array. A request the loop cannot
        serve is refused here, before it is queued, with a ``TypeError`` (an argument of the wrong kind) or a
        ``ValueError`` (ids outside the vocabulary, longer than the model's positions or the KV cache, an id
        already queued or running) naming the request and the argument; nothing else is affected.
        """
        request_checks.check_request_id(request_id)
        if request_id in self._ids:
            raise ValueError(f"request {request_id!r} is already queued or running")
        prompt = request_checks.token_ids(request_id, prompt)
        max_new_tokens = request_checks.new_token_count(request_id, max_new_tokens)
        cached = _tokens_cached(len(prompt), max_new_tokens)
        self.limits.check(request_id, prompt, cached, max_new_tokens)
        longest = self.max_blocks_per_seq * self.block_size
        if cached > longest:
            raise ValueError(
                f"request {request_id!r} caches up to {cached} tokens (prompt {len(prompt)} + {max_new_tokens} new, "
                f"the last never fed back); the KV cache serves at most {longest} per request"
            )
        if self._blocks_for(cached) > self.kv_cache.num_blocks - 1:
            raise ValueError(f"request {request_id!r} needs more KV-cache blocks than the whole cache has")
        self._ids.add(request_id)
        self._waiting.append(_Request(request_id, prompt, max_new_tokens))

    def step(self) -> StepResult:
        """Admit, prefill one chunk batch, decode one token for every decoding request; return the requests
        that finished, with their generated tokens, and (``StepResult.failed``) those a failed run dropped.

        A run that raises (the prefill batch's or the decode batch's) fails every request in it, each logged
        and reported with the error; the other requests go on, in this step and the next.
        ``OutOfBlocksError`` when nothing is running and the first waiting request needs more blocks than
        are free (blocks held outside this loop): waiting would never end.
        """
        self._admit()
        result = StepResult()
        self._prefill(result)
        self._decode(result)
        return result

    def generate(self, prompts: Sequence[Any], max_new_tokens: int) -> list[list[int]]:
        """Every prompt's generated tokens, in order: all added at once to an idle loop, stepped until done.

        A request that failed raises its ``RequestFailedError`` (the first one's, in prompt order) once the
        others are done: the loop is idle again."""
        if not self.idle:
            raise RuntimeError("generate() runs a batch of its own: the loop still has requests queued or running")
        try:
            for index, prompt in enumerate(prompts):
                self.add(index, prompt, max_new_tokens)
        except (TypeError, ValueError):
            self._drop_waiting()  # none has run: the loop is left as it was found
            raise
        outputs: dict[Hashable, list[int]] = {}
        failed: dict[Hashable, RequestFailedError] = {}
        while not self.idle:
            result = self.step()
            outputs.update(result)
            failed.update(result.failed)
        if failed:
            raise failed[min(failed)]
        return [outputs[index] for index in range(len(prompts))]

    def _drop_waiting(self) -> None:
        for request in self._waiting:
            self._ids.discard(request.request_id)
        self._waiting.clear()

    # --- scheduling -------------------------------------------------------------------------------------

    def _admit(self) -> None:
        allocator = self.kv_cache.allocator
        while self._waiting and len(self._running) < self.max_running:
            request = self._waiting[0]
            needed = self._blocks_for(_tokens_cached(len(request.prompt), request.max_new_tokens))
            if needed > allocator.num_free:
                if not self._running:  # nothing will free a block: it would wait for ever
                    raise OutOfBlocksError(
                        f"request {request.request_id!r} needs {needed} KV-cache blocks and only {allocator.num_free} are "
                        "free with no request of this loop running: blocks are held outside the loop"
                    )
                return  # first come, first served: later requests wait behind it
            request.blocks = allocator.allocate(needed)
            self._running.append(self._waiting.popleft())

    def _prefill(self, result: StepResult) -> None:
        chunks: list[tuple[_Request, int]] = []  # (request, tokens of its prompt in this batch)
        budget = self.max_chunk_tokens
        for request in self._running:
            if not request.prefilling or budget == 0 or len(chunks) == self.max_requests:
                continue
            take = min(len(request.prompt) - request.cached, budget)
            chunks.append((request, take))
            budget -= take
        if not chunks:
            return
        ids, positions, slots = [], [], []
        for request, take in chunks:
            span = range(request.cached, request.cached + take)
            ids += [request.prompt[p] for p in span]
            positions += list(span)
            slots += [self._slot(request, p) for p in span]
        batch = {
            "input_ids": self._tensor("input_ids", ids),
            "positions": self._tensor("positions", positions),
            "slot_mapping": self._tensor("slot_mapping", slots),
            "query_lens": self._tensor("query_lens", [take for _, take in chunks]),
            "seq_lens": self._tensor("seq_lens", [request.cached + take for request, take in chunks]),
            "block_tables": self._block_tables([request for request, _ in chunks]),
        }
        last_rows, completing = [], []
        row = 0
        for request, take in chunks:
            row += take
            if request.cached + take == len(request.prompt):  # the last token's logits give the first token
                last_rows.append(row - 1)
                completing.append(request)

        def first_tokens() -> list[int]:
            logits = self.prefill.run(batch)
            return logits[last_rows].argmax(dim=-1).tolist() if completing else []

        tokens = self._run("prefill", [request for request, _ in chunks], first_tokens, result)
        if tokens is None:
            return
        for request, take in chunks:
            request.cached += take
        for request, token in zip(completing, tokens):
            self._take(request, token, result)

    def _decode(self, result: StepResult) -> None:
        rows = [request for request in self._running if not request.prefilling]
        if not rows:
            return
        positions = [request.cached for request in rows]  # the token fed sits right after what is cached
        batch = {
            "input_ids": self._tensor("input_ids", [request.token_at(p) for request, p in zip(rows, positions)]),
            "positions": self._tensor("positions", positions),
            "seq_lens": self._tensor("seq_lens", [p + 1 for p in positions]),
            "block_tables": self._block_tables(rows),
            "slot_mapping": self._tensor("slot_mapping", [self._slot(request, p) for request, p in zip(rows, positions)]),
        }
        tokens = self._run("decode", rows, lambda: self.decode.run(batch).argmax(dim=-1).tolist(), result)
        if tokens is None:
            return
        for request, token in zip(rows, tokens):
            request.cached += 1
            self._take(request, token, result)

    def _run(self, phase: str, requests: list[_Request], run: Callable[[], list[int]], result: StepResult) -> list[int] | None:
        """``run``'s tokens, or None after failing every request in it: a run's exception cannot be pinned on
        one of its requests (what one request can get wrong, ``add`` refused), and on CUDA an error inside the
        run surfaces when its tokens are read (``tolist`` waits for the device), so both are inside."""
        try:
            return run()
        except Exception as error:
            batch = [request.request_id for request in requests]
            for request in requests:
                failure = RequestFailedError(request.request_id, phase, batch, error)
                failure.__cause__ = error
                logger.error("graphhal: %s", failure)
                self._finish(request)
                result.failed[request.request_id] = failure
            return None

    def _take(self, request: _Request, token: int, result: StepResult) -> None:
        request.generated.append(token)
        if len(request.generated) < request.max_new_tokens and token not in self.eos_token_ids:
            return
        self._finish(request)
        result[request.request_id] = request.generated

    def _finish(self, request: _Request) -> None:
        """Take ``request`` out of the loop and give its blocks back."""
        self._running.remove(request)
        self._ids.discard(request.request_id)
        self.kv_cache.allocator.free(request.blocks)

    # --- batch tensors ----------------------------------------------------------------------------------

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _slot(self, request: _Request, position: int) -> int:
        return request.blocks[position // self.block_size] * self.block_size + position % self.block_size

    def _tensor(self, slot: str, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=self._dtypes[slot])

    def _block_tables(self, requests: list[_Request]) -> torch.Tensor:
        table = torch.full((len(requests), self.max_blocks_per_seq), NULL_BLOCK, dtype=self._dtypes["block_tables"])
        for row, request in enumerate(requests):
            table[row, : len(request.blocks)] = torch.tensor(request.blocks, dtype=table.dtype)
        return table
