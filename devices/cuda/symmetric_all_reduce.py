"""The cuda device's own all-reduce (``hal_all_reducer``): torch's symmetric-memory kernels for small messages.

NCCL's latency (16 to 25 us a call on H100s and H200s) is most of what a tensor-parallel decode step spends in
its two all-reduces a layer at small batches. torch ships kernels that read the peers' buffers directly over
NVLink (``torch.distributed._symmetric_memory``): one-shot (every rank reads every peer's whole message:
fewest steps, for the smallest messages) and two-shot (each rank reduces its share, then gathers: less
traffic, for larger ones). SGLang runs them inside CUDA graphs (8.95 us against NCCL's 16.46 at 2 KiB, PR
10571), vLLM too (its ``SymmMemCommunicator``). Per message:

    float32 or bfloat16, contiguous, a whole number of 4-byte words, and
      up to ONE_SHOT_MAX_BYTES      one_shot_all_reduce_copy_out   (one kernel, copying the input in itself;
                                    an input at storage offset 0, as the buffer's view is, else two-shot)
      up to TWO_SHOT_MAX_BYTES      copy into the buffer, two_shot_all_reduce_out
    anything else                   None: NCCL (torch.distributed), as before

Off unless ``GRAPHHAL_SYMM_MEM=1``: this path has not yet run on two GPUs in this project's tests. The
crossovers are upstream's, not measured here: one-shot up to Inductor's 128 KiB
(``one_shot_all_reduce_threshold_bytes``), two-shot up to vLLM's limits on sm90 at 2, 4 and 8 ranks. Both can
be set by environment variable, in bytes (``GRAPHHAL_SYMM_MEM_ONE_SHOT_MAX_BYTES``,
``GRAPHHAL_SYMM_MEM_MAX_BYTES``), alike on every rank (ranks that differ get NCCL). The buffer (up to the
largest message, 64 MiB at 2 ranks) sits outside the graph pools, one per rank and group.

Graph safety (torch 2.11's kernels): no host synchronisation and no allocation beyond the output, which a
capture takes from the graph's pool; the signal pads return to zero at the end of every call, so a replay
needs no reset. The buffer is allocated and exchanged (``rendezvous``, which synchronises and talks to the
store) here, before any capture, and lives as long as the reducer; every rank issues the same sequence of
calls (ranks agree on each step's bucket), since the kernels wait for their peers without a timeout.
Multicast stays off (``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` before the exchange; the multimem kernels are never
called), as NVLink multicast is off on the machines this is run on.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

MIB = 1 << 20
ONE_SHOT_MAX_BYTES = 128 * 1024
TWO_SHOT_MAX_BYTES = {2: 64 * MIB, 4: 32 * MIB, 8: 64 * MIB}  # by world size; two-shot's kernels exist for these
SERVED_DTYPES = (torch.float32, torch.bfloat16)  # the kernels' dispatch: no float16
SWITCH_ENV = "GRAPHHAL_SYMM_MEM"  # "1": on; anything else: NCCL for every message
_OPS = ("one_shot_all_reduce_copy_out", "two_shot_all_reduce_out")


class SymmetricAllReducer:
    """One process group's symmetric-memory all-reduce on one GPU (``hal.AllReducer``)."""

    def __init__(self, group_name: str, buffer: torch.Tensor, one_shot_max_bytes: int, max_bytes: int) -> None:
        self.group_name, self.buffer = group_name, buffer
        self.one_shot_max_bytes, self.max_bytes = one_shot_max_bytes, max_bytes
        self.handle: Any = None

    @classmethod
    def allocated(cls, group: Any, device_index: int, one_shot_max_bytes: int, max_bytes: int) -> "SymmetricAllReducer":
        """A reducer whose buffer is allocated, not yet exchanged with the peers (``exchange``)."""
        from torch.distributed import _symmetric_memory as symm_mem

        # Bytes, viewed per message as its dtype: a view of the buffer's start keeps storage offset 0, which
        # the one-shot copy kernel needs to match the input's alignment. Not an inference tensor, whatever
        # mode the model is built in: the copy-in writes it at every step, in or out of inference mode.
        with torch.inference_mode(False):
            buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=torch.device("cuda", device_index))
        return cls(group.group_name, buffer, one_shot_max_bytes, max_bytes)

    def exchange(self) -> None:
        """Map every peer's buffer (collective; synchronises: before any capture). Multicast stays off: torch
        reads the switch when it maps, and no multimem kernel is called here."""
        from torch.distributed import _symmetric_memory as symm_mem

        os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
        self.handle = symm_mem.rendezvous(self.buffer, self.group_name)

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
    """The reducer for ``group`` on this rank's GPU, or None on every rank when any rank cannot have one (the
    reason logged). Collective, and the same sequence of collectives on every rank whatever it finds: one
    gather of what each rank sees, one agreement on peer access, one before the buffer is exchanged and one
    after a first check against NCCL. The kernels wait for their peers with no timeout, so every rank must
    decide alike: sizes and the switch are agreed, not read per process."""
    with torch.cuda.device(device_index):
        seen: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(seen, _what_this_rank_sees(device_index), group=group)
        problem = _group_problem(seen)
        if problem is None:
            problem = _peer_access_problem(seen, device_index)
        if not _all_ranks_agree(problem is None, group, device_index):
            logger.info("graphhal: NCCL for every all-reduce over group %s: %s", group.group_name, problem or "another rank lacks peer access")
            return None
        _, _, _, one_shot, largest = seen[0]  # alike on every rank (_group_problem)
        largest = largest or TWO_SHOT_MAX_BYTES[len(seen)]  # 0: the default for the group's size
        reducer, error = None, None
        try:
            reducer = SymmetricAllReducer.allocated(group, device_index, min(one_shot, largest), largest)
        except Exception as exc:  # out of memory, a driver refusal: every rank learns it before the exchange
            error = exc
        if not _all_ranks_agree(reducer is not None, group, device_index):
            logger.warning("graphhal: NCCL for every all-reduce over group %s: a symmetric buffer failed (%s)", group.group_name, error or "on another rank")
            return None
        assert reducer is not None
        try:
            reducer.exchange()
            _check_against_nccl(reducer, group, device_index)
        except Exception as exc:  # a refusal on one rank only must not split the group
            reducer, error = None, exc
        if not _all_ranks_agree(reducer is not None, group, device_index):
            logger.warning("graphhal: NCCL for every all-reduce over group %s: symmetric memory failed (%s)", group.group_name, error or "on another rank")
            return None
        return reducer


def _what_this_rank_sees(device_index: int) -> tuple[str, str, str | None, int, int]:
    """(host, GPU UUID, why this process cannot use the kernels or None, one-shot limit, largest message or 0
    for the default)."""
    problem = process_problem(device_index)
    try:
        one_shot = int(os.environ.get("GRAPHHAL_SYMM_MEM_ONE_SHOT_MAX_BYTES", ONE_SHOT_MAX_BYTES))
        largest = int(os.environ.get("GRAPHHAL_SYMM_MEM_MAX_BYTES", 0))
    except ValueError as exc:
        problem, one_shot, largest = problem or f"a size variable is not a whole number of bytes ({exc})", 0, 0
    return socket.gethostname(), str(torch.cuda.get_device_properties(device_index).uuid), problem, one_shot, largest


def _group_problem(seen: list[tuple[str, str, str | None, int, int]]) -> str | None:
    """Why the group as a whole cannot use the kernels (None: it can), decided alike on every rank."""
    for rank, (_, _, problem, _, _) in enumerate(seen):
        if problem is not None:
            return f"rank {rank}: {problem}"
    world = len(seen)
    if world not in TWO_SHOT_MAX_BYTES:
        return f"{world} ranks (the two-shot kernel serves 2, 4 or 8)"
    if len({host for host, *_ in seen}) > 1:
        return "ranks on several hosts (symmetric memory maps peers' buffers within one host)"
    if len({uuid for _, uuid, *_ in seen}) < world:
        return "ranks share a GPU (symmetric memory maps one buffer per GPU)"
    if len({(one_shot, largest) for *_, one_shot, largest in seen}) > 1:
        return "ranks set different GRAPHHAL_SYMM_MEM_* sizes: a message would take the kernels on one rank and NCCL on another"
    return None


def _peer_access_problem(seen: list[tuple[str, str, str | None, int, int]], device_index: int) -> str | None:
    """Why this rank's GPU cannot reach every peer's (by UUID: ranks may see different CUDA_VISIBLE_DEVICES)."""
    visible = {str(torch.cuda.get_device_properties(index).uuid): index for index in range(torch.cuda.device_count())}
    for rank, (_, uuid, *_) in enumerate(seen):
        peer = visible.get(uuid)
        if peer is None:
            return f"rank {rank}'s GPU is not visible to this process (make every GPU of the group visible to every rank)"
        if peer != device_index and not torch.cuda.can_device_access_peer(device_index, peer):
            return f"GPU {device_index} has no peer access to rank {rank}'s GPU {peer}"
    return None


def process_problem(device_index: int | None = None) -> str | None:
    """Why this process cannot use the kernels, from what it sees alone (None: nothing against them)."""
    if os.environ.get(SWITCH_ENV, "0") != "1":
        return f"off unless {SWITCH_ENV}=1 (not yet run on two GPUs in this project's tests)"
    missing = [op for op in _OPS if not hasattr(torch.ops.symm_mem, op)]
    if missing:
        return f"torch {torch.__version__} lacks torch.ops.symm_mem.{', '.join(missing)}"
    if device_index is not None and torch.cuda.get_device_capability(device_index) < (9, 0):
        major, minor = torch.cuda.get_device_capability(device_index)
        return f"GPU {device_index} is sm{major}{minor} (the kernels' limits here are set for sm90 and newer)"
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
    problem = process_problem()
    if problem is not None:
        return f"symmetric-memory all-reduce: {problem}; tensor-parallel all-reduces go through NCCL"
    count = torch.cuda.device_count()
    if count < 2:
        return f"symmetric-memory all-reduce: unused ({count} GPU visible; it serves tensor parallel across GPUs); NCCL otherwise"
    old = [index for index in range(count) if torch.cuda.get_device_capability(index) < (9, 0)]
    blocked = [(a, b) for a in range(count) for b in range(count) if a != b and not torch.cuda.can_device_access_peer(a, b)]
    if old or blocked:
        return f"symmetric-memory all-reduce: unavailable (GPUs below sm90: {old}; pairs without peer access: {blocked[:4]}); NCCL there"
    return (
        f"symmetric-memory all-reduce: on, across {count} GPUs with peer access between all pairs: one-shot up to "
        f"{ONE_SHOT_MAX_BYTES // 1024} KiB, two-shot up to {TWO_SHOT_MAX_BYTES[2] // MIB} MiB at 2 ranks, NCCL above"
    )
