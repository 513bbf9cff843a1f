"""Synthetic prefill requests standing in for a server's newly scheduled prompts, and their decode steps after."""

from __future__ import annotations

from typing import Sequence

import torch

from hal import DeviceConventions
from graphhal.paged_attention.block_allocator import NULL_BLOCK
from graphhal.paged_attention.decode_inputs import decode_input_slots
from graphhal.paged_attention.kv_cache import PagedKVCache
from graphhal.paged_attention.prefill_inputs import prefill_request_slots, prefill_token_slots
from graphhal.refmodel.random_context import fill_random_context
from runners import InputSlot


class PrefillWorkload:
    """Requests with ``query_lens[i]`` new tokens each, after an optional cached context, ready for prefill.

    Construction draws each request's new token ids from a CPU generator seeded with ``seed`` (or takes
    ``token_ids``, one list per request), allocates each request's blocks from ``kv_cache.allocator`` (room
    for its context plus its new tokens), and fills each context's K/V in every layer with random values drawn
    on the CPU from ``seed`` (standing in for an earlier prefill). The same arguments give the same batch and
    cache contents on every device.

    ``batch()`` is the prefill-step input, packed and unpadded: request ``i``'s tokens follow request
    ``i - 1``'s, its ``j``-th new token sits at position ``context_lens[i] + j`` and writes the cache slot of
    that position. Running it again rewrites the same slots with the same values. ``decode_batch`` then
    continues every request one token at a time through the decode step.
    """

    def __init__(
        self,
        kv_cache: PagedKVCache,
        query_lens: Sequence[int],
        *,
        context_lens: Sequence[int] | None = None,
        token_ids: Sequence[Sequence[int]] | None = None,
        max_blocks_per_seq: int | None = None,
        seed: int = 0,
        conventions: DeviceConventions | None = None,
    ) -> None:
        config = kv_cache.config
        self.conventions = conventions
        self.kv_cache = kv_cache
        self.config = config
        self.max_blocks_per_seq = config.max_blocks_per_seq if max_blocks_per_seq is None else max_blocks_per_seq
        if self.max_blocks_per_seq <= 0:
            raise ValueError(f"max_blocks_per_seq must be positive, got {self.max_blocks_per_seq}")
        self._capacity = min(self.max_blocks_per_seq * config.block_size, config.max_seq_len)
        self.query_lens = [int(n) for n in query_lens]
        self.context_lens = [0] * len(self.query_lens) if context_lens is None else [int(n) for n in context_lens]
        self._check_lengths()

        generator = torch.Generator().manual_seed(seed)
        if token_ids is None:
            token_ids = [torch.randint(0, config.vocab_size, (n,), generator=generator).tolist() for n in self.query_lens]
        self.token_ids = [[int(t) for t in ids] for ids in token_ids]
        self._check_token_ids()

        self.blocks: list[list[int]] = []
        try:
            for context_len, query_len in zip(self.context_lens, self.query_lens):
                self.blocks.append(kv_cache.allocator.allocate(self._blocks_for(context_len + query_len)))
        except Exception:
            self.release()
            raise
        context_slots = [self._slot(i, p) for i, context_len in enumerate(self.context_lens) for p in range(context_len)]
        fill_random_context(kv_cache, torch.tensor(context_slots, dtype=torch.int64), seed)
        # Tokens each request has in the cache once the prefill (and every decode batch handed out) has run.
        self.cached_lens = [c + q for c, q in zip(self.context_lens, self.query_lens)]

    @property
    def num_requests(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        """Packed new tokens of all requests: the token count of ``batch()``."""
        return sum(self.query_lens)

    def token_slots(self) -> list[InputSlot]:
        return self._for_device(prefill_token_slots())

    def request_slots(self, *, logits_rows: bool = False) -> list[InputSlot]:
        """The request slots matching this workload's block-table width (and ``logits_rows`` when asked)."""
        return self._for_device(prefill_request_slots(self.config, self.max_blocks_per_seq, logits_rows=logits_rows))

    def decode_slots(self) -> list[InputSlot]:
        """The decode-step slots matching ``decode_batch``."""
        return decode_input_slots(self.config, self.max_blocks_per_seq, self.conventions)

    def _for_device(self, slots: list[InputSlot]) -> list[InputSlot]:
        # With the device's conventions the role slots (cache locations, lengths) get its dtypes, and the
        # batches below are built in them (npu: int32 cache locations).
        return slots if self.conventions is None else [slot.for_device(self.conventions) for slot in slots]

    @staticmethod
    def _typed(batch: dict[str, torch.Tensor], slots: list[InputSlot]) -> dict[str, torch.Tensor]:
        dtypes = {slot.name: slot.dtype for slot in slots}
        return {name: tensor.to(dtypes[name]) for name, tensor in batch.items()}

    def token_batch(self, requests: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """``input_ids``, ``positions``, ``slot_mapping`` of the chosen requests' new tokens, packed in order.

        ``requests`` (all by default) are request indices; the result is on the cache's device.
        """
        requests = self._requests(requests)
        ids = [t for i in requests for t in self.token_ids[i]]
        positions = [self.context_lens[i] + j for i in requests for j in range(self.query_lens[i])]
        slots = [self._slot(i, self.context_lens[i] + j) for i in requests for j in range(self.query_lens[i])]
        device = self.kv_cache.device
        batch = {
            "input_ids": torch.tensor(ids, dtype=torch.int64, device=device),
            "positions": torch.tensor(positions, dtype=torch.int64, device=device),
            "slot_mapping": torch.tensor(slots, dtype=torch.int64, device=device),
        }
        return self._typed(batch, self.token_slots())

    def request_batch(self, requests: Sequence[int] | None = None, *, logits_rows: bool = False) -> dict[str, torch.Tensor]:
        """``query_lens``, ``seq_lens``, ``block_tables`` of the chosen requests, one row each, in order; with
        ``logits_rows``, also each request's last token's row among the packed tokens (what a sampler reads).

        ``query_lens`` stays on the host, as a server's scheduler has it: a runner checks it against the
        batch's token count there (``hal.SlotRole.QUERY_LENS``) and copies it to the device itself.
        """
        requests = self._requests(requests)
        device = self.kv_cache.device
        batch = {
            "query_lens": torch.tensor([self.query_lens[i] for i in requests], dtype=torch.int32),
            "seq_lens": torch.tensor(
                [self.context_lens[i] + self.query_lens[i] for i in requests], dtype=torch.int32, device=device
            ),
            "block_tables": self._block_tables(requests),
        }
        if logits_rows:
            ends = torch.tensor([self.query_lens[i] for i in requests], dtype=torch.int64).cumsum(0) - 1
            batch["logits_rows"] = ends.to(device)
        return self._typed(batch, self.request_slots(logits_rows=logits_rows))

    def batch(self, requests: Sequence[int] | None = None, *, logits_rows: bool = False) -> dict[str, torch.Tensor]:
        """The whole prefill-step input: ``token_batch`` then ``request_batch``, call it as ``step(**batch)``."""
        return {**self.token_batch(requests), **self.request_batch(requests, logits_rows=logits_rows)}

    def decode_batch(self, token_ids: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Decode-step inputs (``decode_input_slots``) feeding ``token_ids[i]`` to request ``i`` as its next token.

        The token goes right after what request ``i`` has cached: after its prefill on the first call, after
        the previous decode batch on later ones. Each call moves every request on by one token (allocating a
        block when the token starts one), so run each step before asking for the next batch.
        """
        ids = [int(t) for t in (token_ids.reshape(-1).tolist() if isinstance(token_ids, torch.Tensor) else token_ids)]
        if len(ids) != self.num_requests:
            raise ValueError(f"expected one next token per request ({self.num_requests}), got {len(ids)}")
        for i, position in enumerate(self.cached_lens):
            if position + 1 > self._capacity:
                raise ValueError(f"request {i} would exceed {self._capacity} tokens")
        for i, position in enumerate(self.cached_lens):
            if self._blocks_for(position + 1) > len(self.blocks[i]):
                self.blocks[i] += self.kv_cache.allocator.allocate(1)
        positions = list(self.cached_lens)
        self.cached_lens = [p + 1 for p in positions]
        device = self.kv_cache.device
        batch = {
            "input_ids": torch.tensor(ids, dtype=torch.int64, device=device),
            "positions": torch.tensor(positions, dtype=torch.int64, device=device),
            "seq_lens": torch.tensor(self.cached_lens, dtype=torch.int32, device=device),
            "block_tables": self._block_tables(range(self.num_requests)),
            "slot_mapping": torch.tensor(
                [self._slot(i, p) for i, p in enumerate(positions)], dtype=torch.int64, device=device
            ),
        }
        return self._typed(batch, self.decode_slots())

    def release(self) -> None:
        """Give every request's blocks back to the allocator."""
        for blocks in self.blocks:
            self.kv_cache.allocator.free(blocks)
        self.blocks = []

    def _check_lengths(self) -> None:
        if not self.query_lens:
            raise ValueError("a prefill workload needs at least one request")
        if any(n <= 0 for n in self.query_lens):
            raise ValueError(f"every request needs at least one new token, got query_lens {self.query_lens}")
        if len(self.context_lens) != len(self.query_lens):
            raise ValueError(
                f"context_lens has {len(self.context_lens)} entries but query_lens has {len(self.query_lens)}"
            )
        if any(n < 0 for n in self.context_lens):
            raise ValueError(f"context_lens must be >= 0, got {self.context_lens}")
        for i, (context_len, query_len) in enumerate(zip(self.context_lens, self.query_lens)):
            if context_len + query_len > self._capacity:
                raise ValueError(
                    f"request {i}: context {context_len} + {query_len} new tokens exceeds what a request can hold "
                    f"({self._capacity} tokens: {self.max_blocks_per_seq} blocks of {self.config.block_size}, "
                    f"max_seq_len {self.config.max_seq_len})"
                )

    def _check_token_ids(self) -> None:
        lengths = [len(ids) for ids in self.token_ids]
        if lengths != self.query_lens:
            raise ValueError(f"token_ids has lengths {lengths} but query_lens is {self.query_lens}")
        if any(not 0 <= t < self.config.vocab_size for ids in self.token_ids for t in ids):
            raise ValueError(f"token ids must lie in 0..{self.config.vocab_size - 1}")

    def _requests(self, requests: Sequence[int] | None) -> list[int]:
        if requests is None:
            return list(range(self.num_requests))
        requests = [int(i) for i in requests]
        if not requests or any(not 0 <= i < self.num_requests for i in requests):
            raise ValueError(f"requests must be a non-empty list of indices in 0..{self.num_requests - 1}, got {requests}")
        return requests

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.config.block_size)

    def _slot(self, request: int, position: int) -> int:
        block_size = self.config.block_size
        return self.blocks[request][position // block_size] * block_size + position % block_size

    def _block_tables(self, requests: Sequence[int]) -> torch.Tensor:
        tables = torch.full((len(requests), self.max_blocks_per_seq), NULL_BLOCK, dtype=torch.int32)
        for row, i in enumerate(requests):
            tables[row, : len(self.blocks[i])] = torch.tensor(self.blocks[i], dtype=torch.int32)
        return tables.to(self.kv_cache.device)
