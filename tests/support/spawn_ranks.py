"""Running a test body on several ranks: real processes, a real ``torch.distributed`` process group.

``run_on_ranks(body, world_size=2, backend="gloo")`` spawns one process per rank, each initialises the default
process group (gloo on the cpu, NCCL on GPUs: one GPU per rank) and calls ``body(rank, world_size, *args)``,
a module-level function. It returns every rank's return value, in rank order, or fails the test with every
rank's traceback. No test can hang: a rank still running after ``timeout_s`` is killed and the test fails,
naming it.
"""

from __future__ import annotations

import datetime
import os
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, backend: str, pg_timeout_s: float, body: Callable[..., Any], args: tuple, results: Any) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)  # several ranks share the CI machine's cores
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout_s),
            device_id=torch.device("cuda", rank) if backend == "nccl" else None,
        )
        outcome = (rank, "ok", body(rank, world_size, *args))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the test with it
        outcome = (rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    try:
        # In the pipe before the process group is torn down: put() only buffers, a feeder thread sends it. On
        # torch 2.6, under load, a rank that had finished its body was still unheard of 60 s later (seen twice
        # in whole-suite runs, never alone): the teardown after it is the one thing left that can block.
        results.put(outcome)
        results.close()
        results.join_thread()
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def run_on_ranks(
    body: Callable[..., Any],
    *args: Any,
    world_size: int = 2,
    backend: str = "gloo",
    timeout_s: float = 60.0,
    pg_timeout_s: float = 10.0,
    expect_errors: bool = False,
) -> list[Any]:
    """Every rank's result of ``body``; with ``expect_errors``, every rank's (status, result or error text)."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    processes = [
        context.Process(target=_rank_main, args=(rank, world_size, port, backend, pg_timeout_s, body, args, results))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    outcomes: dict[int, tuple[str, Any]] = {}
    try:
        for _ in range(world_size):
            rank, status, value = results.get(timeout=timeout_s)
            outcomes[rank] = (status, value)
    except Exception:
        pass  # a rank did not report in time: named below
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
    missing = [rank for rank in range(world_size) if rank not in outcomes]
    if missing:
        raise AssertionError(f"rank(s) {missing} did not finish within {timeout_s:g} s: a hang; reported: {outcomes}")
    if expect_errors:
        return [outcomes[rank] for rank in range(world_size)]
    errors = {rank: value for rank, (status, value) in outcomes.items() if status == "error"}
    if errors:
        raise AssertionError("\n".join(f"rank {rank} raised:\n{text}" for rank, text in sorted(errors.items())))
    return [outcomes[rank][1] for rank in range(world_size)]
