"""The generation loop's requests between the steps: queued, admitted, finished.

A request is queued by ``GenerationLoop.add`` once ``check_new`` and ``check_fits`` have passed (its id is
free, and alone it fits the KV cache). ``admit`` takes queued requests first come first served while the
cache has blocks for a whole request (prompt and every token it may generate: no request is ever preempted)
and the batch has room. ``finish`` takes a request out (it ended, was aborted or failed) and gives its blocks
back at once: the device runs its queue in order, so work already queued that writes them runs first.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Hashable

from graphhal.paged_attention.block_allocator import OutOfBlocksError
from graphhal.paged_attention.kv_cache import PagedKVCache
from graphhal.transformers.loop_batches import BatchBuilder
from graphhal.transformers.loop_requests import Request, tokens_cached


class Admission:
    """The loop's queued (``waiting``) and admitted (``running``) requests, and the ids of both.

    release: called with a request's id when it finishes (a drafter forgets what it kept for it)."""

    def __init__(
        self, kv_cache: PagedKVCache, batches: BatchBuilder, max_running: int, release: Callable[[Hashable], None] | None = None
    ) -> None:
        self.kv_cache, self.batches, self.max_running, self.release = kv_cache, batches, max_running, release
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.ids: set[Hashable] = set()

    def check_new(self, request_id: Hashable) -> None:
        if request_id in self.ids:
            raise ValueError(f"request {request_id!r} is already queued or running")

    def check_fits(self, request_id: Hashable, prompt_len: int, max_new_tokens: int) -> None:
        """ValueError when the request could never be admitted: more tokens than a request's cache rows, or more
        blocks than the whole cache has."""
        cached = tokens_cached(prompt_len, max_new_tokens)
        longest = self.batches.max_blocks_per_seq * self.batches.block_size
        if cached > longest:
            raise ValueError(
                f"request {request_id!r} caches up to {cached} tokens (prompt {prompt_len} + {max_new_tokens} new, "
                f"the last never fed back); the KV cache serves at most {longest} per request"
            )
        if self.batches.blocks_for(cached) > self.kv_cache.num_blocks - 1:
            raise ValueError(f"request {request_id!r} needs more KV-cache blocks than the whole cache has")

    def queue(self, request: Request) -> None:
        self.ids.add(request.request_id)
        self.waiting.append(request)

    def admit(self, in_flight: bool) -> None:
        """Admit waiting requests in order while their blocks are free. ``in_flight``: tokens of this loop are
        still to be read back (their requests may end and free blocks)."""
        allocator = self.kv_cache.allocator
        while self.waiting and len(self.running) < self.max_running:
            request = self.waiting[0]
            needed = self.batches.blocks_for(tokens_cached(len(request.prompt), request.max_new_tokens))
            if needed > allocator.num_free:
                if not self.running and not in_flight:  # nothing will free a block: it would wait for ever
                    raise OutOfBlocksError(
                        f"request {request.request_id!r} needs {needed} KV-cache blocks and only {allocator.num_free} are "
                        "free with no request of this loop running: blocks are held outside the loop"
                    )
                return  # first come, first served: later requests wait behind it
            request.blocks = allocator.allocate(needed)
            request.running = True
            self.running.append(self.waiting.popleft())

    def prompt_chunks(self, max_tokens: int, max_requests: int) -> list[tuple[Request, int]]:
        """This step's prefill: ``(request, tokens of its prompt)`` of running requests still prefilling, in
        order, at most ``max_tokens`` tokens (a long prompt goes in chunks over several steps) and ``max_requests``
        requests."""
        chunks: list[tuple[Request, int]] = []
        for request in self.running:
            if not request.prefilling or max_tokens == 0 or len(chunks) == max_requests:
                continue
            take = min(len(request.prompt) - request.cached, max_tokens)
            chunks.append((request, take))
            max_tokens -= take
        return chunks

    def drop_waiting(self, request_id: Hashable) -> bool:
        """Take the waiting request ``request_id`` out of the queue; whether it was there."""
        for request in self.waiting:
            if request.request_id == request_id:
                self.waiting.remove(request)
                self.ids.discard(request_id)
                return True
        return False

    def clear_waiting(self) -> None:
        """Take every waiting request out of the queue (none of them has run)."""
        self.ids.difference_update(request.request_id for request in self.waiting)
        self.waiting.clear()

    def running_request(self, request_id: Hashable) -> Request | None:
        return next((request for request in self.running if request.request_id == request_id), None)

    def finish(self, request: Request) -> None:
        """Take a running ``request`` out and give its blocks back (a finished one is left as it is)."""
        if request.running:
            request.running = False
            self.running.remove(request)
            self.ids.discard(request.request_id)
            self.kv_cache.allocator.free(request.blocks)
            if self.release is not None:
                self.release(request.request_id)
