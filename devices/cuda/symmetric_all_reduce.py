"""The cuda device's own all-reduce (``hal_all_reducer``): torch's symmetric-memory kernels for small messages.

NCCL's latency (16 to 25 us a call on H100s and H200s) is most of what a tensor-parallel decode step spends in
its two all-reduces a layer at small batches. torch ships kernels that read the peers' buffers directly over
NVLink (``torch.distributed._symmetric_memory``): one-shot (every rank reads every peer's whole message:
fewest steps, for the smallest messages) and two-shot (each rank reduces its share, then gathers: less
traffic, for larger ones). SGLang runs them inside CUDA graphs (8.95 us against NCCL's 16.46 at 2 KiB, PR
10571), vLLM too (its ``SymmMemCommunicator``). Per message:

    float32 or bfloat16, contiguous, a whole number of 4-byte words, and
      up to ONE_SHOT_MAX_BYTES      one_shot_all_reduce_copy_out   (one kernel, copying the input in itself)
      up to TWO_SHOT_MAX_BYTES      copy into the buffer, two_shot_all_reduce_out
    anything else                   None: NCCL (torch.distributed), as before

The crossovers are upstream's until the bench measures this machine's (``graphhal bench --tp 2`` prints the
per-size table): one-shot up to Inductor's 128 KiB (``one_shot_all_reduce_threshold_bytes``), two-shot up to
vLLM's and SGLang's limit on sm90 at 2, 4 and 8 ranks. Both can be set by environment variable, in bytes
(``GRAPHHAL_SYMM_MEM_ONE_SHOT_MAX_BYTES``, ``GRAPHHAL_SYMM_MEM_MAX_BYTES``); ``GRAPHHAL_SYMM_MEM=0`` turns the
kernels off.

Graph safety (torch 2.11's kernels): no host synchronisation and no allocation beyond the output, which a
capture takes from the graph's pool; the signal pads return to zero at the end of every call, so a replay
needs no reset. The buffer is allocated and exchanged (``rendezvous``, which synchronises and talks to the
store) here, before any capture, and lives as long as the reducer; every rank issues the same sequence of
calls (ranks agree on each step's bucket), since the kernels wait for their peers without a timeout.
Multicast stays off (``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` before the first rendezvous; the multimem kernels
are never called), as NVLink multicast is off on the machines this is run on.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

MIB = 1 << 20
ONE_SHOT_MAX_BYTES = 128 * 1024
TWO_SHOT_MAX_BYTES = {2: 64 * MIB, 4: 32 * MIB, 8: 64 * MIB}  # by world size; two-shot's kernels exist for these
SERVED_DTYPES = (torch.float32, torch.bfloat16)  # the kernels' dispatch: no float16
SWITCH_ENV = "GRAPHHAL_SYMM_MEM"
_OPS = ("one_shot_all_reduce_copy_out", "two_shot_all_reduce_out")


class SymmetricAllReducer:
    """One process group's symmetric-memory all-reduce on one GPU (``hal.AllReducer``)."""

    def __init__(self, group: Any, device_index: int, one_shot_max_bytes: int, max_bytes: int) -> None:
        from torch.distributed import _symmetric_memory as symm_mem

        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")  # read at every rendezvous
        self.group_name = group.group_name
        self.one_shot_max_bytes, self.max_bytes = one_shot_max_bytes, max_bytes
        # Bytes, viewed per message as its dtype: a view of the buffer's start keeps storage offset 0, which
        # the one-shot copy kernel needs to match the input's alignment.
        self.buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=torch.device("cuda", device_index))
        self.handle = symm_mem.rendezvous(self.buffer, self.group_name)  # collective; synchronises

    def reduce(self, partial: torch.Tensor) -> torch.Tensor | None:
        nbytes = partial.numel() * partial.element_size()
        if partial.dtype not in SERVED_DTYPES or not partial.is_contiguous() or not 0 < nbytes <= self.max_bytes or nbytes % 4:
            return None
        summed = torch.empty_like(partial)
        buffer = self.buffer[:nbytes].view(partial.dtype)
        if nbytes <= self.one_shot_max_bytes and partial.storage_offset() == 0:
            torch.ops.symm_mem.one_shot_all_reduce_copy_out(buffer, partial.view(-1), "sum", self.group_name, summed.view(-1))
        else:
            buffer.copy_(partial.view(-1))
            torch.ops.symm_mem.two_shot_all_reduce_out(buffer, "sum", self.group_name, summed.view(-1))
        return summed

    def describe(self) -> str:
        return (
            f"symmetric memory (torch {torch.__version__}): one-shot up to {self.one_shot_max_bytes // 1024} KiB, "
            f"two-shot up to {self.max_bytes / MIB:g} MiB, NCCL above and for dtypes other than float32 and bfloat16"
        )


def make_symmetric_all_reducer(group: Any, device_index: int) -> SymmetricAllReducer | None:
    """The reducer for ``group`` on this rank's GPU, or None on every rank when any rank cannot have one (its
    reason logged). Collective: ranks agree before allocating and again after trying."""
    problem = local_problem(group, device_index)
    if not _all_ranks_agree(problem is None, group, device_index):
        logger.info("graphhal: NCCL for every all-reduce over group %s: %s", group.group_name, problem or "another rank cannot use symmetric memory")
        return None
    reducer, error = None, None
    try:
        world = dist.get_world_size(group)
        one_shot = int(os.environ.get("GRAPHHAL_SYMM_MEM_ONE_SHOT_MAX_BYTES", ONE_SHOT_MAX_BYTES))
        largest = int(os.environ.get("GRAPHHAL_SYMM_MEM_MAX_BYTES", TWO_SHOT_MAX_BYTES[world]))
        reducer = SymmetricAllReducer(group, device_index, min(one_shot, largest), largest)
        _check_against_nccl(reducer, group, device_index)
    except RuntimeError as exc:  # a driver or P2P refusal, possibly on this rank only
        reducer, error = None, exc
    if not _all_ranks_agree(reducer is not None, group, device_index):
        logger.warning("graphhal: symmetric memory failed over group %s (%s); NCCL for every all-reduce", group.group_name, error or "on another rank")
        return None
    return reducer


def local_problem(group: Any, device_index: int) -> str | None:
    """Why this rank cannot use the kernels (None: it can, as far as it can tell alone)."""
    if os.environ.get(SWITCH_ENV, "1") == "0":
        return f"{SWITCH_ENV}=0"
    world = dist.get_world_size(group)
    if world not in TWO_SHOT_MAX_BYTES:
        return f"{world} ranks (the two-shot kernel serves 2, 4 or 8)"
    missing = [op for op in _OPS if not hasattr(torch.ops.symm_mem, op)]
    if missing:
        return f"torch {torch.__version__} lacks torch.ops.symm_mem.{', '.join(missing)}"
    if torch.cuda.get_device_capability(device_index) < (9, 0):
        return f"GPU {device_index} is sm{''.join(map(str, torch.cuda.get_device_capability(device_index)))} (the kernels are tuned and tested from sm90)"
    peers: list[Any] = [None] * world
    dist.all_gather_object(peers, device_index, group=group)
    if len(set(peers)) != world:
        return f"ranks share GPUs ({peers}): symmetric memory maps one buffer per GPU"
    unreachable = [peer for peer in peers if peer != device_index and not torch.cuda.can_device_access_peer(device_index, peer)]
    if unreachable:
        return f"GPU {device_index} has no peer access to GPU(s) {unreachable}"
    return None


def _all_ranks_agree(fine: bool, group: Any, device_index: int) -> bool:
    verdict = torch.tensor([1 if fine else 0], device=torch.device("cuda", device_index))
    dist.all_reduce(verdict, op=dist.ReduceOp.MIN, group=group)
    return bool(verdict.item())


def _check_against_nccl(reducer: SymmetricAllReducer, group: Any, device_index: int) -> None:
    """One message per kernel, against NCCL's sum, before anything relies on them."""
    rank = dist.get_rank(group)
    for numel in (1024, reducer.one_shot_max_bytes // 4 + 1024):  # one-shot, then two-shot
        if numel * 4 > reducer.max_bytes:
            continue
        partial = torch.arange(numel, dtype=torch.float32, device=torch.device("cuda", device_index)) * (rank + 1)
        expected = partial.clone()
        dist.all_reduce(expected, group=group)
        summed = reducer.reduce(partial)
        if summed is None or not torch.equal(summed, expected):
            raise RuntimeError(f"the symmetric-memory all-reduce of {numel} float32 values disagreed with NCCL's")


def stack_check_line() -> str:
    """``graphhal info``'s line on the kernels, from this process alone (no group needed)."""
    if os.environ.get(SWITCH_ENV, "1") == "0":
        return f"symmetric-memory all-reduce: off ({SWITCH_ENV}=0); tensor-parallel all-reduces go through NCCL"
    missing = [op for op in _OPS if not hasattr(torch.ops.symm_mem, op)]
    if missing:
        return f"symmetric-memory all-reduce: unavailable (torch {torch.__version__} lacks {', '.join(missing)}); NCCL for every all-reduce"
    count = torch.cuda.device_count()
    if count < 2:
        return f"symmetric-memory all-reduce: unused ({count} GPU visible; it serves tensor parallel across GPUs); NCCL otherwise"
    blocked = [(a, b) for a in range(count) for b in range(count) if a != b and not torch.cuda.can_device_access_peer(a, b)]
    if blocked:
        return f"symmetric-memory all-reduce: unavailable between GPU pairs {blocked[:4]} (no peer access); NCCL there"
    return (
        f"symmetric-memory all-reduce: available across {count} GPUs (peer access between all pairs): one-shot up to "
        f"{ONE_SHOT_MAX_BYTES // 1024} KiB, two-shot up to {TWO_SHOT_MAX_BYTES.get(2, 0) // MIB} MiB at 2 ranks, NCCL above"
    )
