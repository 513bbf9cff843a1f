"""Block tables for paged-attention kernel tests: each row owns shuffled, non-contiguous cache blocks."""

from __future__ import annotations

import torch


def shuffled_block_tables(blocks_per_row: list[int], max_blocks: int, num_blocks: int, generator: torch.Generator) -> torch.Tensor:
    """[rows, max_blocks] int32: row ``i`` owns ``blocks_per_row[i]`` blocks drawn, in shuffled order, from
    1..num_blocks-1 (no two rows share one); the rest of each row is the null block 0."""
    owned = (torch.randperm(num_blocks - 1, generator=generator) + 1).tolist()
    block_tables = torch.zeros(len(blocks_per_row), max_blocks, dtype=torch.int32)
    for row, count in enumerate(blocks_per_row):
        block_tables[row, :count] = torch.tensor(owned[:count], dtype=torch.int32)
        owned = owned[count:]
    return block_tables
