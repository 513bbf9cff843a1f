"""The cpu reference device's model of device-wide memory: what ``mem_get_info`` would say if the host's
memory were a card's.

A graph costs more than its pool on a GPU: the graph object, the driver's executable graph (per kernel node)
and communicators' per-graph buffers sit outside the pool (SGLang PR 15927, NCCL issue 1234), and a server
that plans with the pool alone sizes its KV cache too large. The cpu device models both shares, so that a
plan made here meets the same arithmetic it meets on a GPU:

- the pools: every live ``RecordingPool``'s segments (what the caching allocator would hold for graphs);
- outside the pools: ``NODE_BYTES`` per op of every live ``RecordedGraph``, standing for the executable
  graph's per-node memory. The figure is a model, not a measurement: it makes the outside-pool share
  visible and makes it grow with the number of graphs and their ops, as on a GPU.

The capacity is ``GRAPHHAL_CPU_DEVICE_MIB`` (default 65536: 64 GiB). Tensors the program allocates itself
(weights, a KV cache) are its own host memory and are not counted: the model is about what graphs take.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

CAPACITY_ENV = "GRAPHHAL_CPU_DEVICE_MIB"
DEFAULT_CAPACITY_MIB = 64 * 1024
NODE_BYTES = 2048  # per recorded op: the executable graph's share of one kernel node (modelled)

_pools: "weakref.WeakSet[Any]" = weakref.WeakSet()
_graphs: "weakref.WeakSet[Any]" = weakref.WeakSet()


def track_pool(pool: Any) -> None:
    """Count ``pool``'s segments for as long as it lives."""
    _pools.add(pool)


def track_graph(graph: Any) -> None:
    """Count ``graph``'s recorded ops for as long as it lives (and holds them)."""
    _graphs.add(graph)


def capacity_bytes() -> int:
    text = os.environ.get(CAPACITY_ENV, "")
    try:
        mib = int(text) if text else DEFAULT_CAPACITY_MIB
    except ValueError:
        raise ValueError(f"{CAPACITY_ENV} must be a whole number of MiB, got {text!r}") from None
    if mib <= 0:
        raise ValueError(f"{CAPACITY_ENV} must be positive, got {mib}")
    return mib * 1024 * 1024


def used_bytes() -> int:
    """What graphs hold device-wide: every live pool's segments plus every live graph's nodes."""
    return sum(pool.bytes for pool in list(_pools)) + sum(graph.num_ops for graph in list(_graphs)) * NODE_BYTES


def mem_get_info() -> tuple[int, int]:
    """(free, total) bytes, as ``torch.cuda.mem_get_info`` returns them."""
    total = capacity_bytes()
    return max(total - used_bytes(), 0), total
