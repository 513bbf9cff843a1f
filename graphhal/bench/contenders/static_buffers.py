"""Static input buffers, kept the way a server keeps them for a graph: one set per size, loaded every step.

The hand-written floor, reduce-overhead and the setup measurements all build their graphs on such buffers;
graphhal's runners keep their own (``StaticInputs``).
"""

from __future__ import annotations

from typing import Callable

import torch

from graphhal.bench.contenders.contender import Batch
from graphhal.bench.workload import Workload


def static_copy(batch: Batch) -> dict[str, torch.Tensor]:
    """Static input buffers for one batch size, holding that batch (contiguous, as the runner's are)."""
    return {name: tensor.clone(memory_format=torch.contiguous_format) for name, tensor in batch.items()}


def input_loader(static: dict[str, torch.Tensor]) -> Callable[[Batch], None]:
    """The per-step input copy into ``static``, done as ``StaticInputs.load`` does it for a batch that fills its
    bucket: one ``torch._foreach_copy_`` per dtype (one kernel each on CUDA), the groups made once."""
    groups: dict[torch.dtype, list[str]] = {}
    for name, tensor in static.items():
        groups.setdefault(tensor.dtype, []).append(name)
    plan = [(names, [static[name] for name in names]) for names in groups.values()]

    def load(batch: Batch) -> None:
        for names, destinations in plan:
            torch._foreach_copy_(destinations, [batch[name] for name in names], non_blocking=True)

    return load


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
