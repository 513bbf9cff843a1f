"""The generation loop's batches: host values in page-locked memory, and the fed tokens taken on the device.

Everything a step needs but the token it feeds is known on the host before the step runs: positions, cache
slots, lengths, block tables, sampling parameters (a request's ``counter`` is how many tokens it has sampled,
read back or not). Those go to the runner as host tensors in page-locked memory, which the runner copies to
its buffers without the host waiting for the device. The token a decode row feeds is the one the request
sampled last, still on the device: gathered there from the outputs of the step that sampled it.
"""

from __future__ import annotations

import torch

from graphhal.paged_attention.block_allocator import NULL_BLOCK
from graphhal.paged_attention.kv_cache import NULL_SLOT, PagedKVCache
from graphhal.sampling import SAMPLING_SLOT_NAMES
from graphhal.transformers.loop_requests import Request
from runners import DecodeRunner, PrefillRunner


class BatchBuilder:
    """Builds the decode and prefill batches of the loop's runners (their slots' dtypes, their device)."""

    def __init__(self, decode: DecodeRunner, prefill: PrefillRunner, kv_cache: PagedKVCache) -> None:
        self.dtypes = {slot.name: slot.dtype for slot in (*decode.slots, *prefill.slots)}
        self.device = decode.device.torch_device
        # Page-locked host memory only where there is a device to copy to (torch cannot pin without one).
        self.pinned = self.device.type != "cpu"
        self.block_size = kv_cache.block_size
        self.max_blocks_per_seq = kv_cache.config.max_blocks_per_seq

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def prefill(self, chunks: list[tuple[Request, int]]) -> dict[str, torch.Tensor]:
        """One packed batch of prompt chunks ``(request, tokens)``, each after what its request has cached; every
        request samples at its chunk's last token (only those whose prompt ends there keep the token)."""
        ids, positions, slots, last_rows = [], [], [], []
        for request, take in chunks:
            span = range(request.cached, request.cached + take)
            ids += [request.prompt[p] for p in span]
            positions += span
            slots += [self.slot(request, p) for p in span]
            last_rows.append(len(ids) - 1)
        requests = [request for request, _ in chunks]
        return {
            "input_ids": self.host("input_ids", ids),
            "positions": self.host("positions", positions),
            "slot_mapping": self.host("slot_mapping", slots),
            "query_lens": self.host("query_lens", [take for _, take in chunks]),
            "seq_lens": self.host("seq_lens", [request.cached + take for request, take in chunks]),
            "block_tables": self.block_tables(requests),
            "sample_rows": self.host("sample_rows", last_rows),
            **self._sampling(requests),
        }

    def decode(self, rows: list[Request], input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """One decode batch: each request feeds its last sampled token (``input_ids``, on the device) at the
        position right after what it has cached."""
        positions = [request.cached for request in rows]
        return {
            "input_ids": input_ids,
            "positions": self.host("positions", positions),
            "seq_lens": self.host("seq_lens", [p + 1 for p in positions]),
            "block_tables": self.block_tables(rows),
            "slot_mapping": self.host("slot_mapping", [self.slot(r, p) for r, p in zip(rows, positions)]),
            **self._sampling(rows),
        }

    def fed_tokens(
        self,
        rows: list[Request],
        last_decode: torch.Tensor | None,
        prefill_tokens: torch.Tensor | None,
    ) -> torch.Tensor:
        """Each row's last sampled token, gathered on the device from the last decode step's tokens and this
        step's prefill tokens (``Request.source`` says which, and which row of them): queued work, no host read.
        A source ``("host", token)`` is a token already read back (a speculative step's last)."""
        sources, offset = [], {}
        known = [request.source[1] for request in rows if request.source[0] == "host"]  # type: ignore[index]
        if known:
            offset["host"] = 0
            sources.append(self.host("input_ids", known).to(self.device, non_blocking=True))
        if last_decode is not None:
            offset["decode"] = sum(len(source) for source in sources)
            sources.append(last_decode)
        if prefill_tokens is not None:
            offset["prefill"] = sum(len(source) for source in sources)
            sources.append(prefill_tokens)
        index, hosted = [], 0
        for request in rows:
            kind, row = request.source  # type: ignore[misc]
            if kind == "host":
                row, hosted = hosted, hosted + 1
            index.append(offset[kind] + row)
        pool = sources[0] if len(sources) == 1 else torch.cat(sources)
        return pool.index_select(0, self.host("input_ids", index).to(self.device, non_blocking=True))

    # --- host tensors ------------------------------------------------------------------------------------

    def _sampling(self, requests: list[Request]) -> dict[str, torch.Tensor]:
        """The sampling slots of ``requests``: their parameters, and each one's counter (tokens sampled so far,
        which picks the random numbers of this draw)."""
        values = {
            "temperature": [r.sampling.temperature for r in requests],
            "top_k": [r.sampling.top_k for r in requests],
            "top_p": [r.sampling.top_p for r in requests],
            "min_p": [r.sampling.min_p for r in requests],
            "seed": [r.sampling.seed for r in requests],
            "counter": [r.scheduled for r in requests],
        }
        assert tuple(values) == SAMPLING_SLOT_NAMES
        return {name: self.host(name, column) for name, column in values.items()}

    def host(self, slot: str, values: list) -> torch.Tensor:
        tensor = torch.tensor(values, dtype=self.dtypes.get(slot, torch.int64))
        return tensor.pin_memory() if self.pinned else tensor

    def slot(self, request: Request, position: int) -> int:
        return request.blocks[position // self.block_size] * self.block_size + position % self.block_size

    def slots_or_null(self, request: Request, start: int, count: int) -> list[int]:
        """The cache slots of ``count`` positions from ``start``, a block's run at a time (one ``range`` where
        ``slot`` per position cost 0.4 us each: 32 us a verify step at 16 requests and k = 4). A position past
        the request's blocks (a draft it can never keep: it would pass max_new_tokens) writes the null slot."""
        size, blocks = self.block_size, request.blocks
        block, offset = divmod(start, size)
        if offset + count <= size and block < len(blocks):  # the common case: every position in one block
            first = blocks[block] * size + offset
            return list(range(first, first + count))
        slots: list[int] = []
        position, end = start, start + count
        while position < end:
            block, offset = divmod(position, size)
            run = min(size - offset, end - position)
            if block < len(blocks):
                first = blocks[block] * size + offset
                slots += range(first, first + run)
            else:
                slots += [NULL_SLOT] * run
            position += run
        return slots

    def block_tables(self, requests: list[Request]) -> torch.Tensor:
        """One row per request: its blocks, then the null block. Each request's row is a tensor made once
        (blocks are allocated at admission), stacked into a new table every step: a table made from the rows'
        lists cost 12 us at 16 requests, the stack 3 us (and a tensor per request and step, 115 us)."""
        if not requests:
            table = torch.empty(0, self.max_blocks_per_seq, dtype=self.dtypes["block_tables"])
        else:
            table = torch.stack([self._block_row(request) for request in requests])
        return table.pin_memory() if self.pinned else table

    def _block_row(self, request: Request) -> torch.Tensor:
        made = request.block_row
        if made is None or made[0] is not request.blocks or made[1] != len(request.blocks):
            row = [*request.blocks, *[NULL_BLOCK] * (self.max_blocks_per_seq - len(request.blocks))]
            row_tensor = torch.tensor(row, dtype=self.dtypes["block_tables"])
            made = request.block_row = (request.blocks, len(request.blocks), row_tensor)
        return made[2]
