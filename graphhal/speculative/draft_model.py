"""``DraftModelDrafter``: a smaller model with the target's vocabulary proposes the drafts (transformers'
``assistant_model``), through runners of its own, its graphs in the target's pool.

What is captured, and why. The draft model runs through its own plain runners, built like the target's
(``graphhal.transformers.decode_runner`` and ``prefill_runner``, sampling greedily): a step's first draft
comes from one replay of a draft prefill graph, which feeds each request's tokens not yet in the draft
cache (normally the token the verify step produced last, plus the last accepted draft when every draft was
accepted: the catch-up token) and samples at the last of them; the other ``k - 1`` drafts come from the
draft decode graph (one token per request, per batch-size bucket), replayed ``k - 1`` times, each replay
fed the tokens of the one before on the device. One graph per draft step, replayed, rather than the ``k``
steps in one graph: the same graphs serve every ``k`` (several ``k`` in one server share them), the draft
cache catches up with whatever was accepted without a graph per catch-up length, and a replay costs a few
microseconds against a draft step's kernels. No host round trip happens inside a propose: positions, cache
slots and lengths are known on the host beforehand, and the drafts stay on the device.

Its KV cache stays in step with the accepted tokens without being told what was accepted: it remembers
which tokens it wrote (the request's tokens, then its own drafts, read back at the next propose from a copy
that has long landed) and keeps the longest prefix that the request's tokens still agree with; the rest is
written again. Keys and values of a rejected draft are simply overwritten.

Every draft output handed on is a copy the drafter owns (``submit``), never a view of the shared pool: the
next draft replay, or the target's verify replay, rewrites the pool (vLLM PR 53520). A step that runs
eagerly instead of replaying (mode disabled, a batch over the largest bucket) is counted in
``eager_steps`` and logged once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence

import torch

from graphhal.paged_attention.block_allocator import NULL_BLOCK, OutOfBlocksError
from graphhal.paged_attention.kv_cache import NULL_SLOT, PagedKVCache
from graphhal.sampling import SAMPLING_SLOT_NAMES
from graphhal.speculative.drafter import DraftRequest, check_draft_count
from runners import DecodeRunner, PrefillRunner

logger = logging.getLogger(__name__)

_GREEDY = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": 0, "counter": 0}


@dataclass(eq=False)
class _Cached:
    """What the draft cache holds for one request."""

    blocks: list[int]
    written: list[int] = field(default_factory=list)  # the tokens whose keys and values sit at positions 0..
    pending: tuple[Any, Any, int] | None = None  # (host copy of a propose's drafts, its event, row): written next


class DraftModelDrafter:
    """decode, prefill: the draft model's runners, sampling (``graphhal.transformers.decode_runner`` and
    ``prefill_runner`` over ``kv_cache``), captured in the target's pool.
    kv_cache:       the draft model's own paged KV cache; a request takes blocks for ``max_len - 1`` tokens (as
                    the target's cache: its last token is never fed) at its first propose and gives them back
                    at ``release``."""

    def __init__(self, decode: DecodeRunner, prefill: PrefillRunner, kv_cache: PagedKVCache) -> None:
        for name, runner in (("decode", decode), ("prefill", prefill)):
            if not set(SAMPLING_SLOT_NAMES) <= {slot.name for slot in runner.slots}:
                raise TypeError(f"DraftModelDrafter: the {name} runner does not sample; build it with graphhal.transformers.{name}_runner")
        self.decode, self.prefill, self.kv_cache = decode, prefill, kv_cache
        self.device = decode.device
        self.dtypes = {slot.name: slot.dtype for slot in (*decode.slots, *prefill.slots)}
        self.block_size = kv_cache.block_size
        self.max_blocks_per_seq = kv_cache.config.max_blocks_per_seq
        self.eager_steps = 0  # draft steps run eagerly instead of replaying a graph
        self._cached: dict[Hashable, _Cached] = {}

    def capture(self) -> None:
        """Capture the draft model's graphs: prefill (the larger) first, then decode, into their pool. Capture
        them after the target's (larger) graphs of the same pool."""
        self.prefill.capture()
        self.decode.capture()

    def propose(self, requests: Sequence[DraftRequest], num_draft_tokens: int) -> torch.Tensor:
        k = check_draft_count(num_draft_tokens, "DraftModelDrafter")
        if not requests:
            return torch.empty(0, k, dtype=torch.int64, device=self.device.torch_device)
        states = [self._catch_up(request) for request in requests]
        drafts = [self._first_drafts(requests, states)]
        for step in range(1, k):
            drafts.append(self._next_drafts(requests, states, drafts[-1], step))
        stacked = torch.stack(drafts, dim=1)
        host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=self.device.torch_device.type != "cpu")
        host.copy_(stacked, non_blocking=True)
        event = self.device.event()
        event.record()
        for row, (request, state) in enumerate(zip(requests, states)):
            state.written = list(request.tokens)
            state.pending = (host, event, row) if k > 1 else None  # drafts 1..k-1 are written; the last never is
        return stacked

    def release(self, request_id: Hashable) -> None:
        state = self._cached.pop(request_id, None)
        if state is not None:
            self.kv_cache.allocator.free(state.blocks)

    # --- the draft cache -----------------------------------------------------------------------------------

    def _catch_up(self, request: DraftRequest) -> _Cached:
        """The request's cache state, with ``written`` cut to what its tokens still agree with."""
        state = self._cached.get(request.request_id)
        if state is None:
            # Like the target's cache: the last token a request generates is never fed, so its keys and values
            # need max_len - 1 positions; a draft past them writes the null slot (``_slot``) and is never kept.
            cached = request.max_len - 1
            needed = -(-cached // self.block_size)
            if needed > self.max_blocks_per_seq:
                raise ValueError(
                    f"DraftModelDrafter: request {request.request_id!r} caches up to {cached} tokens ({request.max_len} "
                    f"held, the last never fed); the draft model's KV cache serves at most "
                    f"{self.max_blocks_per_seq * self.block_size} per request: build it with draft_model_drafter(..., like=kv_cache)"
                )
            if needed > self.kv_cache.allocator.num_free:
                raise OutOfBlocksError(
                    f"DraftModelDrafter: request {request.request_id!r} needs {needed} blocks of the draft model's KV cache "
                    f"and {self.kv_cache.allocator.num_free} are free: give the draft cache at least as many blocks as the "
                    f"target's (draft_model_drafter(..., like=kv_cache) does)"
                )
            state = self._cached[request.request_id] = _Cached(self.kv_cache.allocator.allocate(needed))
        if state.pending is not None:
            host, event, row = state.pending
            event.synchronize()  # long done: the verify step after it was read back
            state.written += host[row, :-1].tolist()
            state.pending = None
        tokens, agreed = request.tokens, 0
        limit = min(len(state.written), len(tokens) - 1)  # the last token is always fed: it gives the first draft
        while agreed < limit and state.written[agreed] == tokens[agreed]:
            agreed += 1
        del state.written[agreed:]
        return state

    def _first_drafts(self, requests: Sequence[DraftRequest], states: list[_Cached]) -> torch.Tensor:
        """Feed every request's tokens not yet cached (in prefill batches of at most the largest bucket) and
        sample each one's first draft at its last token: [n] on the device."""
        todo = [list(range(len(state.written), len(request.tokens))) for request, state in zip(requests, states)]
        sources: list[torch.Tensor] = []
        where = [0] * len(requests)  # the row, among every batch's tokens put together, of each first draft
        taken = 0
        while any(todo):
            chunks, budget = [], self.prefill.config.max_size
            for index, positions in enumerate(todo):
                if positions and budget and len(chunks) < self.prefill.config.max_requests:
                    take = positions[:budget]
                    del positions[: len(take)]
                    chunks.append((index, take))
                    budget -= len(take)
            tokens = self._submit(self.prefill, self._prefill_batch(requests, states, chunks))
            for row, (index, take) in enumerate(chunks):
                states[index].written += [requests[index].tokens[p] for p in take]
                if not todo[index]:
                    where[index] = taken + row
            sources.append(tokens)
            taken += len(tokens)
        pool = sources[0] if len(sources) == 1 else torch.cat(sources)
        return pool.index_select(0, torch.tensor(where, device=pool.device))

    def _next_drafts(self, requests: Sequence[DraftRequest], states: list[_Cached], fed: torch.Tensor, step: int) -> torch.Tensor:
        positions = [len(request.tokens) - 1 + step for request in requests]
        batch = {
            "input_ids": fed,
            "positions": self._host("positions", positions),
            "seq_lens": self._host("seq_lens", [min(p + 1, len(s.blocks) * self.block_size) for p, s in zip(positions, states)]),
            "block_tables": self._block_tables(states),
            "slot_mapping": self._host("slot_mapping", [self._slot(s, p) for s, p in zip(states, positions)]),
            **self._greedy(len(requests)),
        }
        return self._submit(self.decode, batch)

    def _prefill_batch(self, requests: Sequence[DraftRequest], states: list[_Cached], chunks: list[tuple[int, list[int]]]) -> dict[str, torch.Tensor]:
        ids, positions, slots, last_rows = [], [], [], []
        for index, take in chunks:
            ids += [requests[index].tokens[p] for p in take]
            positions += take
            slots += [self._slot(states[index], p) for p in take]
            last_rows.append(len(ids) - 1)
        chosen = [states[index] for index, _ in chunks]
        return {
            "input_ids": self._host("input_ids", ids),
            "positions": self._host("positions", positions),
            "slot_mapping": self._host("slot_mapping", slots),
            "query_lens": self._host("query_lens", [len(take) for _, take in chunks]),
            "seq_lens": self._host("seq_lens", [take[-1] + 1 for _, take in chunks]),
            "block_tables": self._block_tables(chosen),
            "sample_rows": self._host("sample_rows", last_rows),
            **self._greedy(len(chunks)),
        }

    def _submit(self, runner: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The step's sampled tokens, copied out of the graph pool (``submit``); an eager step is counted."""
        if not runner.can_run(batch):
            self.eager_steps += 1
            if self.eager_steps == 1:
                logger.warning(
                    "graphhal: the draft model's %s runner ran a step eagerly instead of replaying a graph (mode %s, %d rows); "
                    "DraftModelDrafter.eager_steps counts every such step", runner.phase, runner.config.mode,
                    len(batch["input_ids"]),
                )
        return runner.submit(batch, keep=["tokens"]).outputs["tokens"]

    # --- host tensors ------------------------------------------------------------------------------------

    def _greedy(self, rows: int) -> dict[str, torch.Tensor]:
        return {name: self._host(name, [_GREEDY[name]] * rows) for name in SAMPLING_SLOT_NAMES}

    def _host(self, slot: str, values: list) -> torch.Tensor:
        tensor = torch.tensor(values, dtype=self.dtypes.get(slot, torch.int64))
        return tensor.pin_memory() if self.device.torch_device.type != "cpu" else tensor

    def _slot(self, state: _Cached, position: int) -> int:
        """Where a position's keys and values go; past the request's blocks (a draft for a token the request
        can never hold) the null slot, which no request reads."""
        block = position // self.block_size
        return state.blocks[block] * self.block_size + position % self.block_size if block < len(state.blocks) else NULL_SLOT

    def _block_tables(self, states: list[_Cached]) -> torch.Tensor:
        table = torch.full((len(states), self.max_blocks_per_seq), NULL_BLOCK, dtype=self.dtypes["block_tables"])
        for row, state in enumerate(states):
            table[row, : len(state.blocks)] = torch.tensor(state.blocks, dtype=table.dtype)
        return table.pin_memory() if self.device.torch_device.type != "cpu" else table
