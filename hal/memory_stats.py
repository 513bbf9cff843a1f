"""What a device reports about its memory (``hal_memory_stats``)."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass(frozen=True)
class MemoryStats:
    """Byte counts. ``pool_bytes`` is None when no pool was asked about or the device cannot tell.

    ``device_free_bytes`` and ``device_total_bytes`` are the device as a whole, as its driver sees it (CUDA's
    ``mem_get_info``): what every process and every allocator holds, graph objects, executable graphs and
    communicator buffers included, which a pool's share leaves out. None where the device cannot tell.
    """

    allocated_bytes: int = 0
    reserved_bytes: int = 0
    pool_bytes: int | None = None
    device_free_bytes: int | None = None
    device_total_bytes: int | None = None

    @property
    def device_used_bytes(self) -> int | None:
        """Device memory in use, device-wide (None where the device does not report it)."""
        if self.device_free_bytes is None or self.device_total_bytes is None:
            return None
        return self.device_total_bytes - self.device_free_bytes
