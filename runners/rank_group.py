"""What the ranks of a process group agree on, so that none hangs while another fails or goes its own way.

Capturing across ranks is a collective act (tensor parallel: every rank's graphs hold the same all-reduces):
every rank must capture the same buckets in the same order, and a rank that fails must make every rank fail,
never leave the others waiting in a collective. The anchors paid for each rule:

- ranks disagreeing on what to capture, or on graph vs eager at run time: vLLM 25906, 30173, 45094;
- warm-up work still running on one rank when another began capturing: SGLang 33356 (PR 33795, 34286),
  fixed by a synchronize and a group barrier after the last warm-up.

Agreement runs on a gloo group of the same ranks (the control group, made once per group): host-side,
bounded by its timeout, and independent of the device's own communicator (NCCL, HCCL), whose collectives
the graphs capture. Each agreement point is one object all-gather of (stage, outcome), so every rank makes
the same number of control collectives whatever happened locally, and every rank raises the same error.
"""

from __future__ import annotations

import datetime
import pickle
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist

import hal


class RankCaptureError(hal.CaptureError):
    """Capturing failed on some rank (``rank``: the first that did); every rank of the group raises it, at the
    same point, so none is left waiting."""


class RankRunError(hal.GraphHalError, RuntimeError):
    """A run failed on some rank of a consensus group; every rank raises it at the same point."""


_FITS, _MISFIT, _FAILED = 0, 1, 2  # a rank's status in the per-run agreement


@dataclass(frozen=True)
class _Outcome:
    stage: str
    error: str | None  # "Type: message" of what this rank raised there, None when it succeeded
    # When this rank reported its failure (host clock). A rank whose peer failed mid-collective fails too,
    # later, when its collective times out: the earliest failure is the cause, the others are its echoes.
    failed_at: float | None = None


_control_groups: dict[str, Any] = {}
_control_timeouts: dict[str, float] = {}  # the timeout each control group was last set to
_control_lock = threading.Lock()


def control_group(group: Any, timeout_s: float) -> Any:
    """A gloo group of ``group``'s ranks for agreements, made once per group and shared by its runners.

    Always a group of its own, a gloo device group included: agreements must never interleave with the
    model's own collectives on one communicator (a rank that failed between two of them would send its
    agreement against its peer's all-reduce), and they need their own timeout. Made with
    ``use_local_synchronization``: only the group's ranks take part, so a server with several
    tensor-parallel groups in one world does not need every rank to make every group's control group.
    Each runner sets its own timeout on it before each agreement (``RankGroup._gather``): a server whose
    prefill runner waits 600 s and whose decode runner waits 5 s gets what it asked for from each.
    """
    with _control_lock:
        if group.group_name not in _control_groups:
            _control_groups[group.group_name] = dist.new_group(
                dist.get_process_group_ranks(group),
                backend="gloo",
                timeout=datetime.timedelta(seconds=timeout_s),
                use_local_synchronization=True,
            )
            _control_timeouts[group.group_name] = timeout_s
        return _control_groups[group.group_name]


def _use_timeout(control: Any, timeout_s: float) -> None:
    """Make ``timeout_s`` the control group's timeout for its next collectives (a dict lookup when it already is)."""
    name = control.group_name
    if _control_timeouts.get(name) != timeout_s:
        dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=timeout_s), control)
        _control_timeouts[name] = timeout_s


def _all_gather_within(timeout_s: float, outputs: list[torch.Tensor], tensor: torch.Tensor, control: Any) -> None:
    """``dist.all_gather`` on the control group, waited for at most ``timeout_s``.

    The control group's own timeout (``_use_timeout``) ends a collective on torch 2.9 and later; torch 2.6
    keeps for gloo the timeout the group was made with, whatever it is set to after, so every runner of a
    group would wait as long as its first. The wait bounds the agreement on every torch."""
    work = dist.all_gather(outputs, tensor, group=control, async_op=True)
    work.wait(timeout=datetime.timedelta(seconds=timeout_s))


def _all_gather_objects_within(timeout_s: float, value: Any, size: int, control: Any) -> list[Any]:
    """``dist.all_gather_object`` (which has no asynchronous form), each of its two collectives bounded."""
    payload = torch.frombuffer(bytearray(pickle.dumps(value)), dtype=torch.uint8)
    lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
    _all_gather_within(timeout_s, lengths, torch.tensor([payload.numel()]), control)
    longest = max(int(length) for length in lengths)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: payload.numel()] = payload
    gathered = [torch.empty(longest, dtype=torch.uint8) for _ in range(size)]
    _all_gather_within(timeout_s, gathered, padded, control)
    return [pickle.loads(data[: int(length)].numpy().tobytes()) for data, length in zip(gathered, lengths)]


def rank_group(group: Any, timeout_s: float, device: str) -> "RankGroup | SoloRank":
    """The agreements of a runner over ``group``; without a group, a ``SoloRank`` that agrees with itself."""
    return SoloRank() if group is None else RankGroup(group, timeout_s, device)


class SoloRank:
    """No process group: every agreement is this process's own outcome, so a runner runs one code path with
    or without ranks. An error is raised as it is; success agrees at once."""

    is_group = False

    def agree_on_plan(self, plan: Mapping[str, Any], *, mode: str) -> None:
        return None

    def agree(self, stage: str, error: BaseException | None, *, bucket: int | None, mode: str) -> None:
        if error is not None:
            raise error

    def after_warmup(self, bucket: int, error: BaseException | None, what: str, *, mode: str) -> None:
        return None  # the warm-up's own error is raised where it happened

    def agree_on_batch(self, rows: int, fits: bool, error: BaseException | None = None) -> tuple[int, list[int]]:
        if error is not None:
            raise error
        return rows, [] if fits else [0]


class RankGroup:
    """One runner's view of a process group: its rank, its size, and the agreements it takes part in.

    group:     the process group (tensor or data parallel) whose ranks capture and run together.
    timeout_s: how long a rank waits for the others at an agreement point before it gives up with an error
               naming the stage (a rank that died, or one stuck in a collective of the device's own).
    device:    the runner's device, named in every error.
    """

    is_group = True

    def __init__(self, group: Any, timeout_s: float, device: str) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("a runner's process group needs torch.distributed initialised (init_process_group)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.timeout_s = timeout_s
        self.device = device
        self.control = control_group(group, timeout_s)

    # --- capture ----------------------------------------------------------------------------------------

    def agree_on_plan(self, plan: Mapping[str, Any], *, mode: str) -> None:
        """Raise ``RankCaptureError`` on every rank unless all ranks are about to capture the same thing."""
        device = self.device
        plans = self._gather(dict(plan), "agreeing on what to capture", mode=mode, bucket=None)
        differences = []
        for rank, other in enumerate(plans):
            for field, value in other.items():
                if value != plans[0].get(field):
                    differences.append(f"rank {rank} has {field} {value!r} where rank 0 has {plans[0].get(field)!r}")
        if differences:
            first = next(rank for rank, other in enumerate(plans) if other != plans[0])
            raise RankCaptureError(
                "the ranks of the process group would capture different graphs: " + "; ".join(differences)
                + ". Every rank must build its runner with the same config, input slots and groups.",
                bucket=None, mode=mode, device=device, rank=first,
            )

    def agree(self, stage: str, error: BaseException | None, *, bucket: int | None, mode: str) -> None:
        """All ranks report how ``stage`` went here; raise ``RankCaptureError`` on every rank unless all
        reached it and succeeded. This rank's own error is chained as the cause."""
        device = self.device
        outcome = _Outcome(stage, None, None) if error is None else _Outcome(stage, f"{type(error).__name__}: {error}", time.time())
        outcomes = self._gather(outcome, stage, mode=mode, bucket=bucket)
        errors = sorted((rank for rank, o in enumerate(outcomes) if o.error is not None), key=lambda r: outcomes[r].failed_at)
        elsewhere = [rank for rank, o in enumerate(outcomes) if o.error is None and o.stage != outcomes[0].stage]
        if not errors and not elsewhere and outcomes[0].stage == stage:
            return
        reports = [f"rank {rank} failed at {outcomes[rank].stage}: {outcomes[rank].error}" for rank in errors]
        reports += [f"rank {rank} was at {outcomes[rank].stage}" for rank in elsewhere]
        # The same rank on every rank, whoever reports it: the one that failed first, else the first elsewhere.
        culprit = (errors or elsewhere or [0])[0]
        raise RankCaptureError(
            f"capture stopped on every rank of the group at {outcomes[culprit].stage} (this is rank {self.rank}): "
            + "; ".join(reports),
            bucket=bucket, mode=mode, device=device, rank=culprit,
        ) from error

    def after_warmup(self, bucket: int, error: BaseException | None, what: str, *, mode: str) -> None:
        """``hal.graph_per_key.AfterWarmup``: every rank learns whether every rank warmed ``what`` up at ``bucket``."""
        self.agree(f"the warm-up of {what} at bucket {bucket}", error, bucket=bucket, mode=mode)

    def _gather(self, value: Any, stage: str, *, mode: str, bucket: int | None) -> list[Any]:
        try:
            _use_timeout(self.control, self.timeout_s)
            gathered = _all_gather_objects_within(self.timeout_s, value, self.size, self.control)
        except Exception as exc:  # the control group's timeout, or a peer that went away
            raise RankCaptureError(
                f"rank {self.rank}: the ranks of the group did not all reach {stage} within {self.timeout_s:g} s "
                f"({type(exc).__name__}: {exc}); a rank died, or waits in a collective of its own",
                bucket=bucket, mode=mode, device=self.device,
            ) from exc
        return gathered

    # --- run --------------------------------------------------------------------------------------------

    def agree_on_batch(self, rows: int, fits: bool, error: BaseException | None = None) -> tuple[int, list[int]]:
        """Every rank's row count and whether it fits its graphs; returns (largest row count, the ranks whose
        batch does not fit). One small host all-gather per step (data-parallel consensus).

        ``error``: what this rank's step failed on before the agreement (a refused batch, a moved tensor). Any
        rank's error is a ``RankRunError`` on every rank, raised here, so all leave the step together.
        """
        status = _FAILED if error is not None else (_FITS if fits else _MISFIT)
        mine = torch.tensor([rows, status], dtype=torch.int64)
        everyone = [torch.empty_like(mine) for _ in range(self.size)]
        try:
            _use_timeout(self.control, self.timeout_s)
            _all_gather_within(self.timeout_s, everyone, mine, self.control)
            failed = [rank for rank, t in enumerate(everyone) if int(t[1]) == _FAILED]
            texts: list[Any] = [None] * self.size
            if failed:  # every rank sees it, so every rank makes this second exchange
                text = None if error is None else f"{type(error).__name__}: {error}"
                texts = _all_gather_objects_within(self.timeout_s, text, self.size, self.control)
        except Exception as exc:
            raise RankRunError(
                f"rank {self.rank}: the ranks of the consensus group did not all agree on a run within "
                f"{self.timeout_s:g} s ({type(exc).__name__}: {exc}); a rank died, or is stuck"
            ) from exc
        if failed:
            raise RankRunError(
                f"the step failed on rank(s) {', '.join(map(str, failed))} of the consensus group, so every rank "
                f"refuses it (this is rank {self.rank}): "
                + "; ".join(f"rank {rank}: {texts[rank]}" for rank in failed)
            ) from error
        return max(int(t[0]) for t in everyone), [rank for rank, t in enumerate(everyone) if int(t[1]) == _MISFIT]
