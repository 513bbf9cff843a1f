"""Hands out KV-cache blocks to requests, never the reserved null block."""

from __future__ import annotations

# Block 0 is the padding sink: padded batch rows point their block table at it and write their K/V into
# its first slot. Because no request ever owns it, whatever padding computes can never land in a real
# request's cache.
NULL_BLOCK = 0


class OutOfBlocksError(RuntimeError):
    """The cache has fewer free blocks than a request asked for."""


class BlockAllocator:
    """Free-list of cache block ids ``1 .. num_blocks - 1`` (block 0 is reserved, see ``NULL_BLOCK``).

    Host-side bookkeeping only: it decides which block ids a request owns; the cache tensors never see it.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"a cache needs at least 2 blocks (block {NULL_BLOCK} is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        # Pop from the end, so blocks go out in ascending order: block tables stay easy to read in tests.
        self._free = list(range(num_blocks - 1, NULL_BLOCK, -1))
        self._allocated: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks; raise ``OutOfBlocksError`` (taking none) if fewer are free."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > len(self._free):
            raise OutOfBlocksError(
                f"asked for {n} KV-cache blocks but only {len(self._free)} of {self.num_blocks - 1} usable "
                f"blocks are free (block {NULL_BLOCK} is reserved for padding); build the cache with more blocks"
            )
        blocks = [self._free.pop() for _ in range(n)]
        self._allocated.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Return blocks to the pool. Freeing a block that is not allocated is a bug upstream and raises."""
        not_owned = [b for b in blocks if b not in self._allocated]
        if not_owned or len(set(blocks)) != len(blocks):
            raise ValueError(f"cannot free blocks {blocks}: {not_owned or 'duplicates'} are not allocated (double free?)")
        for block in blocks:
            self._allocated.remove(block)
            self._free.append(block)
