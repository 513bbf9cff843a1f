"""Greedy generation with continuous batching: a small server loop over a decode and a prefill runner.

    loop = GenerationLoop(decode, prefill, kv_cache, eos_token_ids=model.generation_config.eos_token_id)
    loop.add("a", prompt_ids, max_new_tokens=32)
    while not loop.idle:
        for request_id, tokens in loop.step().items():   # the requests that finished in this step
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
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Sequence

import torch

from graphhal.paged_attention.block_allocator import NULL_BLOCK, OutOfBlocksError
from graphhal.paged_attention.kv_cache import PagedKVCache
from runners import DecodeRunner, PrefillRunner


def _tokens_cached(prompt_len: int, max_new_tokens: int) -> int:
    """The most tokens a request puts in the cache: its last generated token is never fed back."""
    return prompt_len + max_new_tokens - 1


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
    """

    def __init__(
        self,
        decode: DecodeRunner,
        prefill: PrefillRunner,
        kv_cache: PagedKVCache,
        *,
        eos_token_ids: int | Sequence[int] | None = None,
        max_running: int | None = None,
    ) -> None:
        self.decode, self.prefill, self.kv_cache = decode, prefill, kv_cache
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

    def add(self, request_id: Hashable, prompt: Iterable[int], max_new_tokens: int) -> None:
        """Queue a request: its prompt token ids and how many tokens to generate at most."""
        prompt = [int(token) for token in prompt]
        if request_id in self._ids:
            raise ValueError(f"request {request_id!r} is already queued or running")
        if not prompt:
            raise ValueError(f"request {request_id!r} has an empty prompt; it needs at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"request {request_id!r}: max_new_tokens must be at least 1, got {max_new_tokens}")
        cached = _tokens_cached(len(prompt), max_new_tokens)
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

    def step(self) -> dict[Hashable, list[int]]:
        """Admit, prefill one chunk batch, decode one token for every decoding request; return the requests
        that finished, with their generated tokens.

        ``OutOfBlocksError`` when nothing is running and the first waiting request needs more blocks than
        are free (blocks held outside this loop): waiting would never end.
        """
        self._admit()
        finished: dict[Hashable, list[int]] = {}
        self._prefill(finished)
        self._decode(finished)
        return finished

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Every prompt's generated tokens, in order: all added at once to an idle loop, stepped until done."""
        if not self.idle:
            raise RuntimeError("generate() runs a batch of its own: the loop still has requests queued or running")
        for index, prompt in enumerate(prompts):
            self.add(index, prompt, max_new_tokens)
        outputs: dict[Hashable, list[int]] = {}
        while not self.idle:
            outputs.update(self.step())
        return [outputs[index] for index in range(len(prompts))]

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

    def _prefill(self, finished: dict[Hashable, list[int]]) -> None:
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
        logits = self.prefill.run(batch)
        last_rows, completing = [], []
        row = 0
        for request, take in chunks:
            row += take
            request.cached += take
            if not request.prefilling:  # its whole prompt is cached: the last token's logits give the first token
                last_rows.append(row - 1)
                completing.append(request)
        if completing:
            tokens = logits[last_rows].argmax(dim=-1).tolist()
            for request, token in zip(completing, tokens):
                self._take(request, token, finished)

    def _decode(self, finished: dict[Hashable, list[int]]) -> None:
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
        tokens = self.decode.run(batch).argmax(dim=-1).tolist()
        for request, token in zip(rows, tokens):
            request.cached += 1
            self._take(request, token, finished)

    def _take(self, request: _Request, token: int, finished: dict[Hashable, list[int]]) -> None:
        request.generated.append(token)
        if len(request.generated) < request.max_new_tokens and token not in self.eos_token_ids:
            return
        self._running.remove(request)
        self._ids.discard(request.request_id)
        self.kv_cache.allocator.free(request.blocks)
        finished[request.request_id] = request.generated

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
