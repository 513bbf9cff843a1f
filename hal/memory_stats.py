"""What a device reports about its memory (``hal_memory_stats``)."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass(frozen=True)
class MemoryStats:
    """Byte counts. ``pool_bytes`` is None when no pool was asked about or the device cannot tell."""

    allocated_bytes: int = 0
    reserved_bytes: int = 0
    pool_bytes: int | None = None
