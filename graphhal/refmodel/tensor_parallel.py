"""Tensor parallelism for the reference decoder: which slice of each weight a rank holds, and the all-reduce.

Megatron's split, as vLLM and SGLang serve Llama: the QKV and gate/up projections are column-parallel (each
rank computes its own heads and its own slice of the MLP's inner dimension), the output and down projections
are row-parallel (each rank multiplies its slice, and an all-reduce sums the partial results), embedding and
LM head are replicated. Every rank draws the full weights from the same seed and keeps its slice, so a model
at TP=2 computes what the same seed computes at TP=1.

The all-reduce is the custom op ``refmodel::all_reduce``: torch.compile keeps it as one node (piecewise pieces
and Inductor's kernels are built around it, and a captured graph holds the collective), and the cpu device's
recorded graphs re-issue it at every replay, on every rank, in order. Each message goes to the device's own
all-reduce where it has one for the message (``hal_all_reducer``, set up once per group by
``use_device_all_reduce``: CUDA's symmetric-memory kernels for small messages), else to ``torch.distributed``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

import hal
from graphhal.paged_attention.direct_kernels import unobserved_eager_call

logger = logging.getLogger(__name__)

# Process group name -> (the group, the device's own all-reduce for it or None: torch.distributed for every
# message). Keyed by name because the op is (a custom op takes strings, not process groups); filled before any
# capture. The group is kept to tell a new group of a recycled name (a re-initialised WORLD is "0" again).
_DEVICE_REDUCERS: dict[str, tuple[Any, "hal.AllReducer | None"]] = {}


@dataclass(frozen=True)
class TensorParallel:
    """Where one rank stands in its tensor-parallel group (size 1, rank 0, no group: not parallel)."""

    group: Any = None
    rank: int = 0
    size: int = 1

    @classmethod
    def of(cls, group: Any) -> "TensorParallel":
        if group is None:
            return cls()
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    def rows(self, weight: torch.Tensor, *sizes: int) -> torch.Tensor:
        """This rank's slice of each consecutive block of rows (the blocks' full sizes in ``sizes``)."""
        return self._slice(weight, 0, sizes)

    def columns(self, weight: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the columns."""
        return self._slice(weight, 1, (weight.shape[1],))

    def _slice(self, weight: torch.Tensor, dim: int, sizes: tuple[int, ...]) -> torch.Tensor:
        if self.size == 1:
            return weight
        pieces, start = [], 0
        for size in sizes:
            share = size // self.size
            pieces.append(weight.narrow(dim, start + self.rank * share, share))
            start += size
        return torch.cat(pieces, dim=dim).contiguous()

    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's ``partial`` (row-parallel outputs); the input when not parallel."""
        if self.size == 1:
            return partial
        if unobserved_eager_call(partial):
            return _summed(partial, self.group)
        return _all_reduce_op(partial, self.group.group_name)


def use_device_all_reduce(group: Any, device: "hal.Device | torch.device | str") -> "hal.AllReducer | None":
    """Route graphhal's all-reduces over ``group`` through ``device``'s own all-reduce where it has one
    (``hal_all_reducer``), and return it (None: ``torch.distributed`` for every message).

    A collective call: every rank of ``group`` calls it at the same point, before anything is captured (the
    tensor-parallel models call it when they are built). Once per group: later calls return the first answer.
    """
    if group is None or dist.get_world_size(group) == 1:
        return None
    name = group.group_name
    known = _DEVICE_REDUCERS.get(name)
    if known is None or known[0] is not group:
        device = device if isinstance(device, hal.Device) else hal.get_device(str(torch.device(device)))
        reducer = device.all_reducer(group)
        _DEVICE_REDUCERS[name] = (group, reducer)
        logger.info(
            "graphhal all-reduce over group %s on %s: %s", name, device,
            reducer.describe() if reducer is not None else f"torch.distributed ({dist.get_backend(group)}) for every message",
        )
    return _DEVICE_REDUCERS[name][1]


def _summed(partial: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum ``partial`` over ``group`` into a new tensor (its callers may still read their partial sums)."""
    known = _DEVICE_REDUCERS.get(group.group_name)
    reducer = known[1] if known is not None and known[0] is group else None
    summed = reducer.reduce(partial) if reducer is not None else None
    if summed is None:
        summed = partial.clone()
        dist.all_reduce(summed, group=group)
    return summed


@torch.library.custom_op("refmodel::all_reduce", mutates_args=())
def all_reduce(partial: torch.Tensor, group_name: str) -> torch.Tensor:
    """Sum ``partial`` over the ranks of the process group named ``group_name``, into a new tensor."""
    return _summed(partial, _resolve_process_group(group_name))


@all_reduce.register_fake
def _(partial, group_name):
    return torch.empty_like(partial)


_all_reduce_op = torch.ops.refmodel.all_reduce.default
