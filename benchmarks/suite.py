"""The bench run: every contender at every size, eager first, then the capture-only measurements.

Per size, every contender is set up in turn (its setup time and pool read right after its own setup), its
first output checked against eager's, and then all are timed together, interleaved (see ``timing``), so
their ratios do not depend on when each happened to run. Everything of a size is released before the next
size is set up. A contender that raises is recorded as failed and the run goes on: one broken mode must not
cost the other measurements.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
from tqdm import tqdm

import hal
from benchmarks.agreement import detached_copy, max_abs_difference
from benchmarks.contenders import (
    DECODE_CONTENDERS,
    PREFILL_CONTENDERS,
    PREFILL_MODES,
    Contender,
    Prepared,
    decode_lineup,
    prefill_lineup,
)
from benchmarks.device_description import describe_device
from benchmarks.memory import release_memory
from benchmarks.names import DECODE, EAGER, FLOOR, FULL_INDUCTOR, PREFILL, REDUCE_OVERHEAD, SETUP, STATIC_REDUCE_OVERHEAD
from benchmarks.results import BenchResult, CaptureCost, Failed, Header, Row, SetupCost, Skipped
from benchmarks.setup import capture_cost, compiled_setup, prefill_setup
from benchmarks.setup.compiled_setup import DEFAULT_STATIC_SIZES
from benchmarks.timing import StepTimer, TimerSettings
from benchmarks.workload import PrefillCase, PrefillShape, Workload, build_reference_workload
from refmodel import ModelConfig

CPU_NOTE = (
    "the cpu device is graphhal's reference device: its graphs re-issue recorded ops for faithful semantics, "
    "not speed, so no graph mode is expected to beat eager there. Run on a GPU for real speedups."
)


@dataclass
class BenchPlan:
    """Everything one run measures.

    ``capture_max_bs`` None skips every capture-only measurement; ``compiled_setups`` off skips the compiled
    decode setups for every bucket up to it (CUDA only), ``static_sizes`` are the batch sizes the
    dynamic=False reduce-overhead setup compiles (the rest extrapolated); ``prefill_setup_max_tokens`` None
    skips the prefill setup.
    """

    device: hal.Device
    config: ModelConfig
    dtype: torch.dtype
    context_len: int
    batch_sizes: list[int]
    decode_modes: list[str]
    prefill_modes: list[str] = field(default_factory=list)
    prefill_shapes: list[PrefillShape] = field(default_factory=list)
    capture_max_bs: int | None = 256
    compiled_setups: bool = True
    static_sizes: list[int] = field(default_factory=lambda: list(DEFAULT_STATIC_SIZES))
    prefill_setup_max_tokens: int | None = None
    timer: TimerSettings = field(default_factory=TimerSettings)
    show_progress: bool = True
    seed: int = 0


def run_bench(plan: BenchPlan) -> BenchResult:
    started = time.perf_counter()
    device = plan.device
    setup_tokens, setup_note = _prefill_setup_tokens(plan)
    # The KV cache also holds the prefill setup's largest batch, so each bucket it captures could be filled.
    cache_shapes = [*plan.prefill_shapes, *([prefill_setup.cache_shape(plan.config, setup_tokens)] if setup_tokens else [])]
    bench = build_reference_workload(
        device,
        plan.config,
        plan.dtype,
        max_batch_size=max(plan.batch_sizes),
        context_len=plan.context_len,
        prefill_shapes=cache_shapes,
        seed=plan.seed,
    )
    timer = StepTimer(device, plan.timer)
    result = BenchResult(header=_header(plan, bench, timer))
    if device.type == "cpu":
        result.notes.append(CPU_NOTE)

    decode = [c for c in decode_lineup(plan.decode_modes, device) if not _skipped(result, DECODE, c.name, c.skip_reason(device))]
    result.header.modes = {c.name: c.detail for c in decode}
    prefill_modes = _runnable_prefill_modes(plan, result)
    prefill_shapes = [s for s in plan.prefill_shapes if _prefill_shape_fits(s, plan.config, result)] if prefill_modes else []
    cases = len(decode) * len(plan.batch_sizes) + len(prefill_modes) * len(prefill_shapes)
    with torch.no_grad(), tqdm(total=cases, unit="case", disable=not plan.show_progress, leave=False) as bar:
        session = _Session(plan, bench, result, timer, bar)
        for batch_size in plan.batch_sizes:
            batch = bench.decode_batch(batch_size)
            session.measure_size(
                DECODE, {"batch_size": batch_size}, [(c.name, partial(c.prepare, bench, batch)) for c in decode]
            )
        for shape in prefill_shapes:
            session.measure_prefill(shape, prefill_modes)
        if plan.capture_max_bs is not None:
            bar.set_description_str("capture cost")
            result.capture_cost = session.capture_cost(plan.capture_max_bs)
            result.setup_cost = session.setup_cost(plan.capture_max_bs, setup_tokens, setup_note)
    _fill_ratios(result.rows)
    result.wall_s = time.perf_counter() - started
    return result


class _Session:
    """One run's shared state: the model, the timer, the progress bar, and the result being filled in."""

    def __init__(self, plan: BenchPlan, bench: Workload, result: BenchResult, timer: StepTimer, bar: tqdm) -> None:
        self.plan = plan
        self.bench = bench
        self.result = result
        self.timer = timer
        self.bar = bar

    def measure_size(
        self, phase: str, size: dict[str, int], contenders: list[tuple[str, Callable[[], Prepared]]], *, record: bool = True
    ) -> list[Row]:
        """Set up each contender at one size, check its first output against eager's, time them together.

        ``contenders`` are (mode, prepare) pairs, eager first when present: its output is the reference.
        Returns the rows of those that did not fail, appended to the result unless ``record`` is off.
        """
        prepared, rows = self._set_up(phase, size, contenders)
        self.bar.set_description_str(f"{phase} @ {Row(phase, EAGER, **size).size_label}: timing {len(prepared)} together")
        try:
            timings = self.timer.time_together({mode: ready.run for mode, ready in prepared.items()})
        finally:
            prepared.clear()  # the last references to this size's graphs, before they are released
            release_memory(self.plan.device)
        measured = []
        for mode, timing in timings.items():
            if isinstance(timing, Exception):
                self._failed(phase, mode, rows[mode].size_label, timing)
                continue
            rows[mode].set_timing(timing)
            measured.append(rows[mode])
        if record:
            self.result.rows.extend(measured)
            self.bar.update(len(contenders))
        return measured

    def _set_up(
        self, phase: str, size: dict[str, int], contenders: list[tuple[str, Callable[[], Prepared]]]
    ) -> tuple[dict[str, Prepared], dict[str, Row]]:
        """Each contender prepared and its first output checked against eager's; failures recorded."""
        prepared: dict[str, Prepared] = {}
        rows: dict[str, Row] = {}
        expected = None
        for mode, prepare in contenders:
            row = Row(phase, mode, **size)
            self.bar.set_description_str(f"{phase} @ {row.size_label}: setting up {mode}")
            try:
                ready = prepare()
                first = detached_copy(ready.run())
                if mode == EAGER:
                    expected = first
                elif expected is not None:
                    row.max_abs_diff = max_abs_difference(first, expected)
            except Exception as exc:  # recorded and printed; the command exits non-zero
                self._failed(phase, mode, row.size_label, exc)
                continue
            row.setup_s, row.pool_bytes = ready.setup_s, ready.pool_bytes
            prepared[mode], rows[mode] = ready, row
        return prepared, rows

    def _failed(self, phase: str, mode: str, size: str, exc: Exception) -> None:
        self.result.failed.append(Failed(phase, mode, size, f"{type(exc).__name__}: {exc}"))

    def measure_prefill(self, shape: PrefillShape, modes: list[Contender[PrefillCase]]) -> None:
        try:
            case = self.bench.prefill_case(shape, seed=self.plan.seed)
        except Exception as exc:
            self._failed(PREFILL, "(workload)", shape.label, exc)
            self.bar.update(len(modes))
            return
        contenders = [(c.name, partial(c.prepare, self.bench, case)) for c in modes]
        try:
            self.measure_size(PREFILL, {"tokens": shape.tokens, "requests": shape.requests}, contenders)
        finally:
            case.release()

    def capture_cost(self, max_bs: int) -> CaptureCost | None:
        device = self.plan.device
        try:
            cost = capture_cost.capture_all_buckets(self.bench, max_bs, self.plan.show_progress)
        except Exception as exc:
            self._failed(DECODE, "capture cost", f"buckets up to {max_bs}", exc)
            return None
        if "breakable" not in device.modes:
            cost.note = f"no one-break cost: device {device} has no breakable mode"
            return cost
        try:
            cost.breaks = capture_cost.count_breaks(self.bench)
        except Exception as exc:
            self._failed(DECODE, "break count", "1", exc)
            return cost
        cost.full_bs1_ms, cost.breakable_bs1_ms = self._bs1_ms("full", "breakable")
        return cost

    def setup_cost(self, max_bs: int, prefill_tokens: int | None, prefill_note: str) -> SetupCost | None:
        """The compiled decode setups for every bucket up to ``max_bs``, then the prefill setups; None if off."""
        plan = self.plan
        if not plan.compiled_setups and prefill_tokens is None:
            return None
        cost = SetupCost()
        if plan.compiled_setups:
            cost.max_bs = max_bs
            self._compiled_setups(cost, max_bs)
        if prefill_tokens is not None:
            cost.notes += [prefill_note] if prefill_note else []
            self._prefill_setups(cost, prefill_tokens)
        return cost

    def _compiled_setups(self, cost: SetupCost, max_bs: int) -> None:
        device, show = self.plan.device, self.plan.show_progress
        skipped = compiled_setup.skip_reasons(device)
        for name in compiled_setup.COMPILED_SETUPS:
            _skipped(self.result, SETUP, name, skipped.get(name))
        if len(skipped) == len(compiled_setup.COMPILED_SETUPS):
            return
        buckets = compiled_setup.decode_buckets(max_bs)
        static_sizes = compiled_setup.static_sizes(self.plan.static_sizes, max_bs)
        measurements = {
            FULL_INDUCTOR: (
                f"{len(buckets)} buckets up to {max_bs}",
                partial(compiled_setup.full_inductor, self.bench, max_bs, show),
            ),
            REDUCE_OVERHEAD: (
                f"{len(buckets)} buckets up to {max_bs}",
                partial(compiled_setup.reduce_overhead, self.bench, buckets[::-1], len(buckets), show),
            ),
            STATIC_REDUCE_OVERHEAD: (
                f"sizes {', '.join(map(str, static_sizes))}",
                partial(compiled_setup.reduce_overhead, self.bench, static_sizes, len(buckets), show, dynamic=False),
            ),
        }
        try:
            compiled_setup.warm_up_compiler(device)
        except Exception as exc:  # without a working compiler no setup below can run either
            self._failed(SETUP, "compiler warm-up", "-", exc)
            return
        for name, (sizes, measure) in measurements.items():
            if name in skipped:
                continue
            self.bar.set_description_str(f"setup: {name} ({sizes})")
            try:
                cost.decode.append(measure())
            except Exception as exc:
                self._failed(SETUP, name, sizes, exc)
                release_memory(device)  # what the failed setup compiled is dropped, never called again

    def _prefill_setups(self, cost: SetupCost, max_tokens: int) -> None:
        device = self.plan.device
        for mode in PREFILL_MODES:
            if _skipped(self.result, SETUP, f"prefill {mode}", PREFILL_CONTENDERS[mode](device).skip_reason(device)):
                continue
            self.bar.set_description_str(f"setup: prefill {mode} (buckets up to {max_tokens} tokens)")
            try:
                cost.prefill.append(prefill_setup.prefill_setup(self.bench, mode, max_tokens, self.plan.show_progress))
            except Exception as exc:
                self._failed(SETUP, f"prefill {mode}", f"buckets up to {max_tokens} tokens", exc)
                release_memory(device)

    def _bs1_ms(self, *modes: str) -> list[float | None]:
        """Step times of ``modes`` at batch 1: from the table when all were measured, else measured now, together."""
        table = {row.mode: row.median_ms for row in self.result.rows if row.phase == DECODE and row.batch_size == 1}
        if not all(mode in table for mode in modes):
            batch = self.bench.decode_batch(1)
            contenders = [(mode, partial(DECODE_CONTENDERS[mode](self.plan.device).prepare, self.bench, batch)) for mode in modes]
            table = {row.mode: row.median_ms for row in self.measure_size(DECODE, {"batch_size": 1}, contenders, record=False)}
        return [table.get(mode) for mode in modes]


def _skipped(result: BenchResult, phase: str, mode: str, reason: str | None) -> bool:
    if reason is not None:
        result.skipped.append(Skipped(phase, mode, reason))
    return reason is not None


def _runnable_prefill_modes(plan: BenchPlan, result: BenchResult) -> list[Contender[PrefillCase]]:
    if not plan.prefill_modes or not plan.prefill_shapes:
        return []
    eager, *named = prefill_lineup(plan.prefill_modes, plan.device)
    modes = [c for c in named if not _skipped(result, PREFILL, c.name, c.skip_reason(plan.device))]
    return [eager, *modes] if modes else []


def _prefill_setup_tokens(plan: BenchPlan) -> tuple[int | None, str]:
    """The prefill setup's max_tokens (None: no prefill setup) and the note saying why it was capped."""
    if plan.capture_max_bs is None or plan.prefill_setup_max_tokens is None:
        return None, ""
    return prefill_setup.setup_tokens(plan.config, plan.prefill_setup_max_tokens)


def _prefill_shape_fits(shape: PrefillShape, config: ModelConfig, result: BenchResult) -> bool:
    longest = max(shape.query_lens())
    if longest > config.max_seq_len:
        result.skipped.append(
            Skipped(PREFILL, shape.label, f"{longest} tokens per request exceed the model's max_seq_len {config.max_seq_len}")
        )
        return False
    return True


def _fill_ratios(rows: list[Row]) -> None:
    """Speedup over eager and ratio to the floor, against the rows of the same phase and size."""
    for row in rows:
        for reference in rows:
            if not reference.same_size(row):
                continue
            if reference.mode == EAGER:
                row.speedup_vs_eager = reference.median_ms / row.median_ms
            elif reference.mode == FLOOR:
                row.ratio_to_floor = row.median_ms / reference.median_ms


def _header(plan: BenchPlan, bench: Workload, timer: StepTimer) -> Header:
    return Header(
        device=str(plan.device),
        device_name=describe_device(plan.device),
        torch_version=torch.__version__,
        dtype=str(plan.dtype).removeprefix("torch."),
        model={name: getattr(plan.config, name) for name in plan.config.__dataclass_fields__},
        context_len=plan.context_len,
        clock=timer.clock_name,
        timer={name: getattr(plan.timer, name) for name in plan.timer.__dataclass_fields__},
        description=bench.describe(),
    )
