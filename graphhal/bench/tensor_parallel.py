"""The bench across tensor-parallel ranks: one process per rank, every rank measuring in lockstep.

Each rank runs the whole bench (``run_bench``) on its own device, with its shard of the model: its graphs hold
the all-reduces, so a step only completes when every rank issues it. Every rank must therefore issue exactly
the same steps in the same order, so the timer is made deterministic here (a fixed number of steps per
sample and of samples: the adaptive stopping rule could stop one rank a sample before another, which would
leave the other waiting in an all-reduce for good). Rank 0's result is the one reported; the others measure
the same steps. A contender failing on one rank only would leave the others waiting in its collectives until
the process group's timeout (10 minutes): the run then fails, naming the ranks.

Each rank runs the bench twice where its device has an all-reduce of its own (``hal_all_reducer``): once with
``torch.distributed`` for every all-reduce, once with the device's, each over a process group of its own (the
device is asked once per group). Then every rank measures one all-reduce per message size by path
(``all_reduce_sizes``): the crossovers, and each step's all-reduce share.

The same model on one device (TP=1) is measured afterwards in the calling process, for the speed-up.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import queue
import socket
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.multiprocessing as mp

import hal
from graphhal.bench import all_reduce_sizes
from graphhal.bench.all_reduce_sizes import AllReduceCost
from graphhal.bench.plan import BenchPlan
from graphhal.bench.results import BenchResult
from graphhal.bench.run import run_bench
from graphhal.bench.timing import TimerSettings
from graphhal.refmodel.tensor_parallel import use_device_all_reduce

# A plan for rank r of the tensor-parallel group, before the group exists: (rank) -> BenchPlan.
RankPlan = Callable[[int], BenchPlan]


def lockstep_timer(settings: TimerSettings, steps_per_repeat: int = 20) -> TimerSettings:
    """``settings`` with every count fixed: all ranks take the same samples of the same steps."""
    repeats = max(settings.min_repeats, 5)
    return dataclasses.replace(settings, min_repeats=repeats, max_repeats=repeats, steps_per_repeat=steps_per_repeat)


@dataclass
class TensorParallelRun:
    """Rank 0's results: the bench per all-reduce path, and one all-reduce's cost per message size and path."""

    by_path: dict[str, BenchResult]  # "torch.distributed", and "device" where the device has its own
    all_reduce: list[AllReduceCost] = field(default_factory=list)
    device_all_reduce: str = ""  # what the device's own all-reduce is, or why there is none


def run_bench_on_ranks(rank_plan: RankPlan, tp_size: int, timeout_s: float = 3600.0) -> TensorParallelRun:
    """Run the bench on ``tp_size`` spawned ranks, the model sharded over them; rank 0's results."""
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
        plan = dataclasses.replace(plan, timer=lockstep_timer(plan.timer), show_progress=plan.show_progress and rank == 0)
        ranks = list(range(tp_size))
        run = TensorParallelRun({})
        for path, switch in (("torch.distributed", "0"), ("device", "1")):
            os.environ["GRAPHHAL_SYMM_MEM"] = switch  # the cuda plugin's switch; other devices ignore it
            group = dist.new_group(ranks)  # its own group: the device is asked afresh for it
            reducer = use_device_all_reduce(group, device)
            if path == "device":
                if reducer is None:
                    checks = hal.default_registry().stack_checks_of(device.type)
                    run.device_all_reduce = "none here: " + "; ".join(checks or ["the device offers none"])
                    break
                run.device_all_reduce = reducer.describe()
            run.by_path[path] = run_bench(dataclasses.replace(plan, tp_group=group))
        run.all_reduce = all_reduce_sizes.measure(device, ranks, plan.dtype, all_reduce_sizes.sizes_for(device))
        # Every rank leaves together: rank 0 hosts the store, and a peer still running when it exits would
        # flood the log with its watchdog's lost-connection warnings.
        dist.barrier()
        results.put((rank, "ok", run if rank == 0 else None))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        results.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
