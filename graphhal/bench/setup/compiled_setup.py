"""Compiled decode setup for every bucket a server captures: graphhal's ``full+inductor`` vs reduce-overhead.

A server compiles its model once and then needs graphs for every batch size it serves (36 default buckets up
to 256). Three ways to get there, each measured from nothing to a replaying graph at every size:

- ``full+inductor``: one ``DecodeRunner(mode="full", compiler="inductor")`` over every bucket: one Inductor
  compile (dynamic batch dim), then graphhal captures each bucket, largest first, in one pool.
- ``reduce-overhead``: ONE ``torch.compile(mode="reduce-overhead")`` object called at every bucket in turn,
  largest first, as a server would (one compiled model, many batch sizes), each size set up as the
  ``reduce-overhead`` contender is: its own static input buffers, KV cache and buffers marked static, batch dim
  marked dynamic, three calls (warm-up, record, first replay). Dynamo still specialises a batch of 1, so it
  compiles more than once: the count is reported.
- ``reduce-overhead dynamic=False``: the same with static shapes, one compile per size, as measured in the
  issue that asked for this (5 to 11 s per batch size). Too slow to run at all 36 sizes, so it runs on a
  subset and the mean per size times the bucket count is reported as an extrapolation.

Fair to each: every setup is measured apart (``Measurements.attempt``: it starts after ``torch._dynamo.reset()``,
so nothing compiled before is reused, and nothing compiled in it is called after the next reset) and with cold
Inductor and Triton caches, a fresh
cache directory each (so their order, or an earlier bench run, cannot make one look cheaper); a throwaway
compile first pays the once-per-process costs (Inductor's imports, its compile workers) that would otherwise
land on whichever setup ran first. CUDA only: reduce-overhead records CUDA graphs, and the cpu device's
graphs cannot capture Inductor kernels.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Iterator

import torch
from tqdm import tqdm

import hal
from graphhal.bench.contenders import DECODE_CONTENDERS
from graphhal.bench.contenders.reduce_overhead import (
    SETUP_CALLS,
    compile_reduce_overhead,
    mark_for_reduce_overhead,
    private_pool_bytes,
    recompile_limit_at_least,
    reduce_overhead_setup_calls,
)
from graphhal.bench.contenders.static_buffers import padded_inputs
from graphhal.bench.measurements import Measurements
from graphhal.bench.names import FULL_INDUCTOR, REDUCE_OVERHEAD, SETUP, STATIC_REDUCE_OVERHEAD
from graphhal.bench.results import CompiledSetup, Failed
from graphhal.bench.setup.setup_meter import metered_setup
from graphhal.bench.workload import Workload
from runners import DecodeConfig, DecodeRunner

# Each setup, and the decode contender whose recipe it follows at every bucket: it runs where that one runs.
_RECIPES = {FULL_INDUCTOR: FULL_INDUCTOR, REDUCE_OVERHEAD: REDUCE_OVERHEAD, STATIC_REDUCE_OVERHEAD: REDUCE_OVERHEAD}
COMPILED_SETUPS = tuple(_RECIPES)


def measure_compiled_setups(
    workload: Workload,
    names: list[str],
    max_bs: int,
    requested_static_sizes: list[int],
    measurements: Measurements,
    show_progress: bool,
) -> list[CompiledSetup]:
    """The setups ``names`` (from ``COMPILED_SETUPS``, those the device can run) for every bucket up to ``max_bs``,
    in that order, after one throwaway compile; those that fail are recorded and left out."""
    if not names:
        return []
    buckets = decode_buckets(max_bs)
    subset = static_sizes(requested_static_sizes, max_bs)
    every_bucket = f"{len(buckets)} buckets up to {max_bs}"
    measures = {
        FULL_INDUCTOR: (every_bucket, partial(full_inductor, workload, max_bs, show_progress)),
        REDUCE_OVERHEAD: (every_bucket, partial(reduce_overhead, workload, buckets[::-1], len(buckets), show_progress)),
        STATIC_REDUCE_OVERHEAD: (
            f"sizes {', '.join(map(str, subset))}",
            partial(reduce_overhead, workload, subset, len(buckets), show_progress, dynamic=False),
        ),
    }
    warm_up = measurements.attempt(SETUP, "compiler warm-up", "-", partial(warm_up_compiler, workload.device))
    if isinstance(warm_up, Failed):  # without a working compiler no setup below can run either
        return []
    setups = []
    for name in names:
        sizes, measure = measures[name]
        measurements.describe(f"setup: {name} ({sizes})")
        setup = measurements.attempt(SETUP, name, sizes, measure)
        if not isinstance(setup, Failed):
            setups.append(setup)
    return setups


def skip_reasons(device: hal.Device) -> dict[str, str]:
    """Setup name -> why it cannot run on ``device``; the setups not named can."""
    reasons = {setup: DECODE_CONTENDERS[recipe](device).skip_reason(device) for setup, recipe in _RECIPES.items()}
    return {setup: reason for setup, reason in reasons.items() if reason is not None}


def decode_buckets(max_bs: int) -> list[int]:
    """The buckets a default ``DecodeRunner`` with this ``max_bs`` captures, ascending."""
    buckets = DecodeConfig(max_bs=max_bs).buckets
    assert buckets is not None  # resolved by the config
    return buckets


def static_sizes(requested: list[int], max_bs: int) -> list[int]:
    """The dynamic=False subset: the requested sizes a server with ``max_bs`` runs (else ``max_bs``), largest first."""
    sizes = sorted({size for size in requested if size <= max_bs}, reverse=True)
    return sizes or [max_bs]


@contextlib.contextmanager
def cold_compile_caches() -> Iterator[None]:
    """Inductor's and Triton's on-disk caches in a fresh temporary directory, removed afterwards."""
    from torch._inductor import utils

    fresh_cache = getattr(utils, "fresh_cache", None) or utils.fresh_inductor_cache  # its name before torch 2.8
    with fresh_cache():
        yield


def warm_up_compiler(device: hal.Device) -> None:
    """One throwaway Inductor compile on ``device``, so per-process start-up costs go to no measured setup."""
    with cold_compile_caches():
        probe = torch.compile(lambda x: torch.relu(x) * 2 + 1)
        probe(torch.ones(8, device=device.torch_device))
        device.synchronize()
        del probe


def full_inductor(workload: Workload, max_bs: int, show_progress: bool) -> CompiledSetup:
    """One ``full`` runner with ``compiler="inductor"`` capturing every default bucket up to ``max_bs``."""
    device = workload.device
    config = DecodeConfig(
        mode=hal.GraphMode.FULL, compiler=hal.Compiler.INDUCTOR, max_bs=max_bs, show_progress=show_progress
    )
    with cold_compile_caches():
        with metered_setup(device) as meter:
            runner = DecodeRunner(workload.decode_step, workload.decode_slots, device, config)
            report = runner.capture()  # the one Inductor compile happens at the first (largest) bucket
        del runner  # before its kernels' cache directory goes
    return CompiledSetup(
        contender=FULL_INDUCTOR,
        detail='DecodeRunner(mode="full", compiler="inductor"): one compile, graphhal captures every bucket',
        sizes=list(report.buckets),
        num_buckets=len(report.buckets),
        setup_s=meter.setup_s,
        compiles=meter.compiles,
        pool_bytes=report.pool_bytes,
    )


def reduce_overhead(
    workload: Workload, sizes: list[int], num_buckets: int, show_progress: bool, *, dynamic: bool = True
) -> CompiledSetup:
    """ONE ``torch.compile(mode="reduce-overhead")`` object set up at each of ``sizes`` in turn.

    ``dynamic``: the batch dim marked dynamic (one compile serves most sizes); else ``dynamic=False``, one
    compile per size.
    """
    torch_device = workload.device.torch_device
    # One compiled function at many static sizes recompiles per size; past Dynamo's recompile limit (8) it
    # would silently run the step eagerly, and this setup would be timed without the compiles it needs.
    # Room for every size, and an error rather than a silent eager fallback should it still run out.
    with cold_compile_caches(), recompile_limit_at_least(len(sizes) + 1, fail_when_hit=True):
        before = private_pool_bytes(torch_device)
        with metered_setup(workload.device) as meter:
            compiled = compile_reduce_overhead(workload.decode_step, dynamic)
            statics = []  # every size's buffers stay alive, as in a server: their graphs read them
            for size in tqdm(sizes, desc="reduce-overhead setup", unit="size", disable=not show_progress, leave=False):
                static = padded_inputs(workload, size)
                mark_for_reduce_overhead(workload, static, dynamic_batch=dynamic)
                reduce_overhead_setup_calls(compiled, static, torch_device)
                statics.append(static)
        pool_bytes = private_pool_bytes(torch_device) - before
        del compiled, statics  # before their kernels' cache directory goes
    marks = "batch dim dynamic" if dynamic else "dynamic=False"
    return CompiledSetup(
        contender=REDUCE_OVERHEAD if dynamic else STATIC_REDUCE_OVERHEAD,
        detail=f'one torch.compile(mode="reduce-overhead") for every size, {marks}, static KV cache and inputs, '
        f"{SETUP_CALLS} calls per size",
        sizes=list(sizes),
        num_buckets=num_buckets,
        setup_s=meter.setup_s,
        compiles=meter.compiles,
        pool_bytes=pool_bytes,
    )
