"""The bench run, start to end: plan -> lineup -> workload -> timed sizes -> setup measurements -> result.

What runs is settled first (``lineup``), then the model is built once, then every decode contender is timed
at every batch size and every prefill contender at every prefill shape, a size at a time, each apart
(``measurements``); then, when asked, what a server pays at startup (``setup``). Rendering the result is the
caller's (``render``); it may print the step-time tables as soon as they are measured (``on_step_tables``).
"""

from __future__ import annotations

import contextlib
import time
from functools import partial
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from graphhal.bench.contenders import Contender
from graphhal.bench.device_description import describe_device
from graphhal.bench.lineup import Lineup, choose_lineup
from graphhal.bench.measurements import Measurements
from graphhal.bench.names import DECODE, PREFILL, SETUP, STEP_TABLE_HEADER, STEP_TABLE_LEGEND
from graphhal.bench.plan import BenchPlan, PrefillShape
from graphhal.bench.results import BenchResult, Failed, Header, SetupCost, fill_ratios
from graphhal.bench.setup import capture_cost, compiled_setup, prefill_setup, restart
from graphhal.bench.timing import StepTimer
from graphhal.bench.workload import PrefillCase, Workload, build_reference_workload
from graphhal.paged_attention import npu_fused_attention_limits

CPU_NOTE = (
    "the cpu device is graphhal's reference device: its graphs re-issue recorded ops for faithful semantics, "
    "not speed, so no graph mode is expected to beat eager there. Run on a GPU for real speedups."
)


def run_bench(plan: BenchPlan, on_step_tables: Callable[[BenchResult, str], None] | None = None) -> BenchResult:
    """Run ``plan``. ``on_step_tables(result, part)`` is called as the main tables fill, so that a caller
    prints each part as soon as it is known rather than after every section (on a GPU the compiled
    contenders and the setup sections take minutes): ``STEP_TABLE_HEADER`` once the workload is built, before
    any step is timed; ``DECODE`` and then ``PREFILL`` once that phase's step times are in (a phase with no
    rows is still announced); ``STEP_TABLE_LEGEND`` after both, before the capture and setup measurements."""
    started = time.perf_counter()
    fallbacks_before = npu_fused_attention_limits.fallbacks_taken()
    with _torch_threads(plan):
        lineup = choose_lineup(plan)
        workload = _build_workload(plan, lineup)
        timer = StepTimer(plan.device, plan.timer)
        result = BenchResult(header=_header(plan, workload, timer), skipped=lineup.skipped)
        result.header.modes = {c.name: c.detail for c in lineup.decode}
        if plan.device.type == "cpu":
            result.notes.append(CPU_NOTE)
        progress = tqdm(total=lineup.timed_cases(plan.batch_sizes), unit="case", disable=not plan.show_progress, leave=False)

        def tables_so_far(part: str) -> None:
            if on_step_tables is not None:
                fill_ratios(result.rows)
                progress.clear()
                on_step_tables(result, part)

        with torch.no_grad(), progress:
            tables_so_far(STEP_TABLE_HEADER)
            measurements = Measurements(plan.device, timer, result, progress)
            for batch_size in plan.batch_sizes:
                batch = workload.decode_batch(batch_size)
                contenders = [(c.name, partial(c.prepare, workload, batch)) for c in lineup.decode]
                measurements.size(DECODE, {"batch_size": batch_size}, contenders)
            tables_so_far(DECODE)
            for shape in lineup.prefill_shapes:
                _measure_prefill(workload, shape, lineup.prefill, plan.seed, measurements)
            tables_so_far(PREFILL)
            tables_so_far(STEP_TABLE_LEGEND)
            if plan.capture_max_bs is not None:
                result.capture_cost = capture_cost.measure_capture_cost(
                    workload, plan.capture_max_bs, measurements, plan.show_progress
                )
                result.setup_cost = _setup_cost(plan, lineup, workload, measurements)
    fill_ratios(result.rows)
    # Where the device's fused attention kernels did not take the model's shapes, what ran instead and why.
    result.notes += [note for note in npu_fused_attention_limits.fallbacks_taken() if note not in fallbacks_before]
    result.wall_s = time.perf_counter() - started
    return result


def _build_workload(plan: BenchPlan, lineup: Lineup) -> Workload:
    """The reference model, or with ``plan.transformers_family`` a transformers model of that family."""
    sizes = dict(max_batch_size=max(plan.batch_sizes), context_len=plan.context_len, prefill_shapes=lineup.cache_shapes, seed=plan.seed)
    if plan.transformers_family is not None:
        from graphhal.bench.transformers_workload import build_transformers_workload  # imports transformers: only when asked

        return build_transformers_workload(
            plan.device, plan.transformers_family, plan.dtype, num_layers=plan.config.num_layers, **sizes  # type: ignore[arg-type]
        )
    return build_reference_workload(plan.device, plan.config, plan.dtype, tp_group=plan.tp_group, **sizes)  # type: ignore[arg-type]


@contextlib.contextmanager
def _torch_threads(plan: BenchPlan) -> Iterator[None]:
    """``plan.cpu_threads`` intra-op threads for a run on the cpu device; torch's count is given back after."""
    threads = torch.get_num_threads()
    try:
        if plan.device.type == "cpu":
            # Measured with another process busy on one of two cores: the tiny model's step went from 1.5 ms
            # at 1 thread to 84 ms at 2, its parallel ops waiting for a descheduled thread every time.
            torch.set_num_threads(plan.cpu_threads)
        yield
    finally:
        torch.set_num_threads(threads)  # the run may be part of a larger process (tests, notebooks)


def _measure_prefill(
    workload: Workload, shape: PrefillShape, contenders: list[Contender[PrefillCase]], seed: int, measurements: Measurements
) -> None:
    """Every prefill contender at one shape, its requests in the KV cache only while they are timed."""
    try:
        case = workload.prefill_case(shape, seed)
    except Exception as exc:
        measurements.failed(PREFILL, "(workload)", shape.label, exc)
        measurements.advance(len(contenders))
        return
    try:
        sized = [(c.name, partial(c.prepare, workload, case)) for c in contenders]
        size = {"tokens": shape.tokens, "requests": shape.requests}
        if shape.decodes:
            size["decodes"] = shape.decodes
        measurements.size(PREFILL, size, sized)
    finally:
        case.release()


def _setup_cost(plan: BenchPlan, lineup: Lineup, workload: Workload, measurements: Measurements) -> SetupCost | None:
    """The compiled decode setups for every bucket up to ``plan.capture_max_bs``, then the prefill setups; None
    if neither is asked for."""
    if not plan.compiled_setups and not plan.restart_setups and lineup.prefill_setup_tokens is None:
        return None
    cost = SetupCost()
    if plan.compiled_setups:
        cost.max_bs = plan.capture_max_bs
        cost.decode = compiled_setup.measure_compiled_setups(
            workload, lineup.compiled_setups, plan.capture_max_bs, plan.static_sizes, measurements, plan.show_progress
        )
    if plan.restart_setups and plan.tp_group is None:
        for name in restart.runnable(plan.device, measurements):
            measured = measurements.attempt(
                SETUP, f"restart {name}", f"buckets up to {plan.capture_max_bs}",
                partial(restart.measure_restart, name, str(plan.device), plan.config, plan.dtype, plan.capture_max_bs, plan.context_len),
            )
            if not isinstance(measured, Failed):
                cost.restarts.append(measured)
    if lineup.prefill_setup_tokens is not None:
        cost.notes += [lineup.prefill_setup_note] if lineup.prefill_setup_note else []
        cost.prefill = prefill_setup.measure_prefill_setups(
            workload, lineup.prefill_setup_modes, lineup.prefill_setup_tokens, measurements, plan.show_progress
        )
    return cost


def _header(plan: BenchPlan, workload: Workload, timer: StepTimer) -> Header:
    return Header(
        device=str(plan.device),
        device_name=describe_device(plan.device),
        torch_version=torch.__version__,
        dtype=str(plan.dtype).removeprefix("torch."),
        model={name: getattr(plan.config, name) for name in plan.config.__dataclass_fields__},
        context_len=plan.context_len,
        clock=timer.clock_name,
        timer={name: getattr(plan.timer, name) for name in plan.timer.__dataclass_fields__},
        description=workload.describe(),
    )
