"""The bench across tensor-parallel ranks: one process per rank, every rank measuring in lockstep.

Each rank runs the whole bench (``run_bench``) on its own device, with its shard of the model: its graphs hold
the all-reduces, so a step only completes when every rank issues it. Every rank must therefore issue exactly
the same steps in the same order, so the timer is made deterministic here (a fixed number of steps per
sample and of samples: the adaptive stopping rule could stop one rank a sample before another, which would
leave the other waiting in an all-reduce for good). Rank 0's result is the one reported; the others measure
the same steps. A contender failing on one rank only would leave the others waiting in its collectives until
the process group's timeout (10 minutes): the run then fails, naming the ranks.

The same model on one device (TP=1) is measured afterwards in the calling process, for the speed-up.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import queue
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

from graphhal.bench.plan import BenchPlan
from graphhal.bench.results import BenchResult
from graphhal.bench.run import run_bench
from graphhal.bench.timing import TimerSettings

# A plan for rank r of the tensor-parallel group, before the group exists: (rank) -> BenchPlan.
RankPlan = Callable[[int], BenchPlan]


def lockstep_timer(settings: TimerSettings, steps_per_repeat: int = 20) -> TimerSettings:
    """``settings`` with every count fixed: all ranks take the same samples of the same steps."""
    repeats = max(settings.min_repeats, 5)
    return dataclasses.replace(settings, min_repeats=repeats, max_repeats=repeats, steps_per_repeat=steps_per_repeat)


def run_bench_on_ranks(rank_plan: RankPlan, tp_size: int, timeout_s: float = 3600.0) -> BenchResult:
    """Run the bench on ``tp_size`` spawned ranks, the model sharded over them; rank 0's result."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    processes = [
        context.Process(target=_rank_main, args=(rank, tp_size, port, rank_plan, results)) for rank in range(tp_size)
    ]
    for process in processes:
        process.start()
    reports: dict[int, tuple[str, Any]] = {}
    try:
        for _ in range(tp_size):
            rank, status, value = results.get(timeout=timeout_s)
            reports[rank] = (status, value)
    except queue.Empty:
        pass  # a rank that did not report in time is named below
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    errors = [f"rank {rank}: {value}" for rank, (status, value) in sorted(reports.items()) if status == "error"]
    missing = [rank for rank in range(tp_size) if rank not in reports]
    if errors or missing:
        raise RuntimeError(
            "the tensor-parallel bench failed: " + "; ".join(errors) + (f"; rank(s) {missing} did not report" if missing else "")
        )
    return reports[0][1]


def _rank_main(rank: int, tp_size: int, port: int, rank_plan: RankPlan, results: Any) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        plan = rank_plan(rank)
        device = plan.device
        if device.torch_device.type == "cuda":
            torch.cuda.set_device(device.torch_device)
        dist.init_process_group(
            device.distributed_backend or "gloo",
            rank=rank,
            world_size=tp_size,
            timeout=datetime.timedelta(minutes=10),
            device_id=device.torch_device if device.torch_device.type == "cuda" else None,
        )
        plan = dataclasses.replace(
            plan, tp_group=dist.group.WORLD, timer=lockstep_timer(plan.timer), show_progress=plan.show_progress and rank == 0
        )
        result = run_bench(plan)
        # Every rank leaves together: rank 0 hosts the store, and a peer still running when it exits would
        # flood the log with its watchdog's lost-connection warnings.
        dist.barrier()
        results.put((rank, "ok", result if rank == 0 else None))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        results.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
