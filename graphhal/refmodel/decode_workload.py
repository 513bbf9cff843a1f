"""Synthetic decode requests standing in for a server's running batch, each with a random cached context."""

from __future__ import annotations

import torch

from hal import DeviceConventions
from graphhal.paged_attention.block_allocator import NULL_BLOCK
from graphhal.paged_attention.decode_inputs import decode_input_slots
from graphhal.paged_attention.kv_cache import PagedKVCache
from graphhal.refmodel.random_context import fill_random_context
from runners import InputSlot


class DecodeWorkload:
    """``num_requests`` requests, each with a random cached context, ready for decode steps.

    Construction draws each request's context length (uniform in ``[min_context_len, max_context_len]``) and
    next token from a CPU generator seeded with ``seed``, so the batch layout is the same on every device;
    allocates each request's blocks from ``kv_cache.allocator`` (room for the context plus the new token);
    and fills the context's K/V in every layer with random values (standing in for a prefill), also drawn on
    the CPU from ``seed``: the same seeds give the same batch and cache on every device.

    ``batch(n)`` is the decode-step input for the first ``n`` requests: row ``i``'s new token sits at
    position ``context_len[i]``, goes to the cache slot right after its context, and attends to
    ``context_len[i] + 1`` tokens. Running the same batch twice rewrites the same slots with the same values,
    so a batch can be replayed for benchmarks; ``advance`` moves requests on by one token.

    ``conventions`` (``Device.conventions``) types the role inputs the way the device's kernels want them
    (the npu takes int32 cache slots): batches and ``input_slots()`` agree on every dtype. Default: the
    dtypes cpu and cuda use.

    ``query_tokens = q > 1`` makes speculative verify batches (``decode_input_slots(..., query_tokens=q)``): each
    request's next token followed by ``q - 1`` random draft tokens (from ``seed``), at positions
    ``context_len .. context_len + q - 1``, written to the slots right after the context, with ``seq_lens``
    ``context_len + q``; room for the ``q`` tokens is allocated. ``advance`` takes one token per request only.
    """

    def __init__(
        self,
        kv_cache: PagedKVCache,
        num_requests: int,
        *,
        max_context_len: int,
        min_context_len: int = 1,
        max_blocks_per_seq: int | None = None,
        seed: int = 0,
        conventions: DeviceConventions | None = None,
        query_tokens: int = 1,
    ) -> None:
        config = kv_cache.config
        self.kv_cache = kv_cache
        self.config = config
        self.conventions = conventions
        self.query_tokens = query_tokens
        self.max_blocks_per_seq = config.max_blocks_per_seq if max_blocks_per_seq is None else max_blocks_per_seq
        self._capacity = min(self.max_blocks_per_seq * config.block_size, config.max_seq_len)
        if num_requests <= 0:
            raise ValueError(f"num_requests must be positive, got {num_requests}")
        if not 0 <= min_context_len <= max_context_len:
            raise ValueError(f"need 0 <= min_context_len ({min_context_len}) <= max_context_len ({max_context_len})")
        if query_tokens < 1:
            raise ValueError(f"query_tokens must be at least 1, got {query_tokens}")
        if max_context_len + query_tokens > self._capacity:
            raise ValueError(
                f"max_context_len {max_context_len} + {query_tokens} new token(s) exceeds what a row can hold "
                f"({self._capacity} tokens: {self.max_blocks_per_seq} blocks of {config.block_size}, max_seq_len "
                f"{config.max_seq_len})"
            )

        generator = torch.Generator().manual_seed(seed)
        self.context_lens = torch.randint(min_context_len, max_context_len + 1, (num_requests,), generator=generator).tolist()
        self.next_tokens = torch.randint(0, config.vocab_size, (num_requests,), generator=generator).tolist()
        self.draft_tokens = torch.randint(0, config.vocab_size, (num_requests, query_tokens - 1), generator=generator).tolist()
        self.blocks: list[list[int]] = []
        try:
            for context_len in self.context_lens:
                self.blocks.append(kv_cache.allocator.allocate(self._blocks_for(context_len + query_tokens)))
        except Exception:
            self.release()
            raise
        fill_random_context(self.kv_cache, self._context_slots(), seed)
        self._build_batch()

    @property
    def num_requests(self) -> int:
        return len(self.context_lens)

    def input_slots(self) -> list[InputSlot]:
        """The runner slots matching this workload's block-table width and dtypes."""
        return decode_input_slots(self.config, self.max_blocks_per_seq, self.conventions, query_tokens=self.query_tokens)

    def batch(self, n: int | None = None) -> dict[str, torch.Tensor]:
        """Decode-step inputs for the first ``n`` requests (all by default), on the cache's device.

        Cheap: the tensors for all requests are built once and each batch is a view of their first ``n``
        rows. Do not write into them.
        """
        n = self.num_requests if n is None else n
        if not 1 <= n <= self.num_requests:
            raise ValueError(f"batch size must be in 1..{self.num_requests}, got {n}")
        return {name: tensor[:n] for name, tensor in self._full_batch.items()}

    def advance(self, next_token_ids: torch.Tensor) -> None:
        """After a step over the first ``k = len(next_token_ids)`` requests: their new tokens are cached now.

        Each of those requests' context grows by one and its next input token becomes the given id; a new
        block is allocated when the next token starts one. Later batches reflect this; batches already
        returned do not change.
        """
        if self.query_tokens > 1:
            raise ValueError(
                "advance moves requests on by one token; a workload of verify batches (query_tokens > 1) is built for "
                "fixed batches: build a new one per step"
            )
        ids = next_token_ids.reshape(-1).tolist()
        if not 1 <= len(ids) <= self.num_requests:
            raise ValueError(f"expected 1..{self.num_requests} next token ids, got {len(ids)}")
        for row, token in enumerate(ids):
            new_len = self.context_lens[row] + 1
            if new_len + 1 > self._capacity:
                raise ValueError(f"request {row} would exceed {self._capacity} tokens")
            if self._blocks_for(new_len + 1) > len(self.blocks[row]):
                self.blocks[row] += self.kv_cache.allocator.allocate(1)
            self.context_lens[row] = new_len
            self.next_tokens[row] = int(token)
        self._build_batch()

    def release(self) -> None:
        """Give every request's blocks back to the allocator."""
        for blocks in self.blocks:
            self.kv_cache.allocator.free(blocks)
        self.blocks = []

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.config.block_size)

    def _context_slots(self) -> torch.Tensor:
        block_size = self.config.block_size
        slots = [
            block * block_size + offset
            for context_len, blocks in zip(self.context_lens, self.blocks)
            for block, offset in ((blocks[t // block_size], t % block_size) for t in range(context_len))
        ]
        return torch.tensor(slots, dtype=torch.int64)

    def _build_batch(self) -> None:
        block_size = self.config.block_size
        q = self.query_tokens
        tables = torch.full((self.num_requests, self.max_blocks_per_seq), NULL_BLOCK, dtype=torch.int32)
        for row, blocks in enumerate(self.blocks):
            tables[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        new_token_slots = [
            [blocks[(context_len + i) // block_size] * block_size + (context_len + i) % block_size for i in range(q)]
            for context_len, blocks in zip(self.context_lens, self.blocks)
        ]
        token_ids = [[token, *drafts] for token, drafts in zip(self.next_tokens, self.draft_tokens)]
        positions = [[context_len + i for i in range(q)] for context_len in self.context_lens]
        if q == 1:  # one token per request: rows of ()
            new_token_slots, token_ids, positions = (
                [row[0] for row in rows] for rows in (new_token_slots, token_ids, positions)
            )
        device = self.kv_cache.device
        dtypes = {slot.name: slot.dtype for slot in self.input_slots()}
        self._full_batch = {
            "input_ids": torch.tensor(token_ids, dtype=dtypes["input_ids"], device=device),
            "positions": torch.tensor(positions, dtype=dtypes["positions"], device=device),
            "seq_lens": torch.tensor([n + q for n in self.context_lens], dtype=dtypes["seq_lens"], device=device),
            "block_tables": tables.to(device, dtypes["block_tables"]),
            "slot_mapping": torch.tensor(new_token_slots, dtype=dtypes["slot_mapping"], device=device),
        }
