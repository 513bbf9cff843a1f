"""A device's own all-reduce for the small messages of tensor-parallel steps, captured in graphs.

``torch.distributed`` (NCCL, HCCL, gloo) serves every message. A decode step at batch 1 all-reduces a few KiB
twice a layer, where a collective library's latency is most of the cost, and devices may have faster paths
for such sizes (the cuda plugin's is in ``devices/cuda/symmetric_all_reduce.py``). A plugin offers one through
``hal_all_reducer``; graphhal's all-reduce asks it for each message and uses ``torch.distributed`` for what it
declines.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class AllReducer(Protocol):
    """What ``hal_all_reducer`` returns: one process group's all-reduce on one device, set up for capture."""

    def reduce(self, partial: torch.Tensor) -> torch.Tensor | None:
        """The sum of every rank's ``partial`` in a new tensor of its shape and dtype, or None to leave this
        message to ``torch.distributed`` (a dtype, size or layout it does not serve). Must decide from the
        tensor's metadata only (every rank decides alike) and issue only device work (it is captured)."""
        ...

    def describe(self) -> str:
        """One line: which kernels serve which message sizes (for ``graphhal info``, logs and the bench)."""
        ...
