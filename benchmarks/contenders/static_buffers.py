"""Static input buffers, kept the way a server keeps them for a graph: one set per size, loaded every step.

The hand-written floor, reduce-overhead and the setup measurements all build their graphs on such buffers;
graphhal's runners keep their own (``StaticInputs``).
"""

from __future__ import annotations

import torch

from benchmarks.contenders.contender import Batch
from benchmarks.workload import Workload


def static_copy(batch: Batch) -> dict[str, torch.Tensor]:
    """Static input buffers for one batch size, holding that batch (contiguous, as the runner's are)."""
    return {name: tensor.clone(memory_format=torch.contiguous_format) for name, tensor in batch.items()}


def load_into(static: dict[str, torch.Tensor], batch: Batch) -> None:
    """The per-step input copy of a server (and of ``StaticInputs.load`` for a batch that fills its bucket)."""
    for name, tensor in batch.items():
        static[name].copy_(tensor, non_blocking=True)


def padded_inputs(workload: Workload, size: int) -> dict[str, torch.Tensor]:
    """Static input buffers of ``size`` rows holding every slot's fill: what a runner captures a bucket with.

    Not the workload's live requests: there are only as many as the largest timed batch, and a server sets up
    every bucket before it has any.
    """
    device = workload.device
    return {
        slot.name: torch.full((size, *slot.row_shape), slot.fill, dtype=slot.dtype, device=device.torch_device)
        for slot in (slot.for_device(device.conventions) for slot in workload.decode_slots)
    }
