"""The bench result as text for the terminal: header, one table per phase, capture cost, what was skipped."""

from __future__ import annotations

from typing import Callable

from hal import MIB, GraphMode
from graphhal.bench.names import (
    DECODE, FULL_INDUCTOR, PREFILL, REDUCE_OVERHEAD, STEP_TABLE_HEADER, STEP_TABLE_LEGEND, TRANSFORMERS_EAGER, TRANSFORMERS_STATIC_COMPILE,
)
from graphhal.bench.results import BenchResult, CaptureCost, CompiledSetup, PoolShare, Row, SetupCost

# (title, width, cell) per column; a cell is "-" where the value does not apply.
_Column = tuple[str, int, Callable[[Row], str]]


def _number(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _timing(row: Row) -> str:
    return f"{row.repeats}x{row.steps_per_repeat} ±{row.rel_error * 100:.1f}%"


_SHARED: list[_Column] = [
    ("mode", 27, lambda r: r.mode),
    ("ms/step", 9, lambda r: f"{r.median_ms:.3f}"),
    ("vs eager", 8, lambda r: _number(r.speedup_vs_eager, ".2f", "x")),
    ("/ floor", 7, lambda r: _number(r.ratio_to_floor, ".2f", "x")),
    ("setup s", 7, lambda r: _number(r.setup_s, ".2f")),
    ("pool MiB", 8, lambda r: _number(None if r.pool_bytes is None else r.pool_bytes / MIB, ".1f")),
    ("max|Δ|", 8, lambda r: _number(r.max_abs_diff, ".2g")),
    ("repeats x steps", 17, _timing),
]
_DECODE: list[_Column] = [("batch", 5, lambda r: str(r.batch_size)), *_SHARED]
_PREFILL: list[_Column] = [
    ("tokens", 6, lambda r: str(r.tokens)),
    # A mixed batch: one prompt chunk plus this many one-token decodes.
    ("reqs", 6, lambda r: f"1+{r.decodes}d" if r.decodes else str(r.requests)),
    *_SHARED,
]
_STEP_COLUMNS = {DECODE: _DECODE, PREFILL: _PREFILL}
_STEP_TABLE_PARTS = (STEP_TABLE_HEADER, DECODE, PREFILL, STEP_TABLE_LEGEND)  # in the order they are printed


def _table(rows: list[Row], columns: list[_Column]) -> list[str]:
    def line(cells: list[str]) -> str:
        # The mode column reads best left-aligned, every number right-aligned.
        return "  ".join(cell.ljust(w) if title == "mode" else cell.rjust(w) for cell, (title, w, _) in zip(cells, columns)).rstrip()

    lines = [line([title for title, _, _ in columns])]
    lines += [line([cell(row) for _, _, cell in columns]) for row in rows]
    return lines


def _capture_cost(cost: CaptureCost) -> list[str]:
    lines = [
        f"capture: {cost.num_buckets} decode buckets up to {cost.max_bs} (full, one pool) in {cost.capture_s:.2f} s; "
        f"pool {cost.pool_bytes_all / MIB:.1f} MiB vs {cost.pool_bytes_largest / MIB:.1f} MiB for bucket "
        f"{cost.max_bs} alone (ratio {_number(cost.pool_ratio, '.2f', 'x')})"
    ]
    if cost.break_cost_us is not None:
        lines.append(
            f"one break: {_break_cost(cost)}  (batch 1: breakable {cost.breakable_bs1_ms:.3f} ms vs full "
            f"{cost.full_bs1_ms:.3f} ms, {cost.breaks} breaks per step)"
        )
    if cost.note:
        lines.append(cost.note)
    if cost.pools:
        lines += ["", *_pool_shares(f"pools: every decode bucket up to {cost.max_bs} against bucket {cost.max_bs} alone", cost.pools)]
    return lines


def _break_cost(cost: CaptureCost) -> str:
    """The cost with its standard error; a difference within twice the error is noise, and said to be."""
    value, error = cost.break_cost_us, cost.break_cost_error_us
    assert value is not None
    if error is None:
        return f"{value:.1f} us"
    if abs(value) < 2 * error:
        return f"not measurable here ({value:.1f} ± {error:.1f} us: the difference is within the timing noise)"
    return f"{value:.1f} ± {error:.1f} us"


def _pool_shares(title: str, shares: list[PoolShare]) -> list[str]:
    """Per mode: the pool of all buckets, of the largest alone, their ratio, and the estimate made after the
    largest bucket against what all of them took."""
    lines = [title, f"{'mode':<12}  {'buckets':>7}  {'all MiB':>8}  {'largest MiB':>11}  {'ratio':>6}  {'estimate MiB':>12}  {'est. error':>10}"]
    for s in shares:
        error = s.estimate_error
        lines.append(
            f"{s.mode:<12}  {s.num_buckets:>7}  {_mib(s.pool_bytes_all):>8}  {_mib(s.pool_bytes_largest):>11}  "
            f"{_number(s.ratio, '.2f', 'x'):>6}  {_mib(s.estimate_bytes):>12}  {_number(None if error is None else error * 100, '+.1f', '%'):>10}"
        )
    return lines


def _mib(value: int | None) -> str:
    return _number(None if value is None else value / MIB, ".1f")


def _compiled_setups(cost: SetupCost) -> list[str]:
    setups = cost.decode
    if not setups:
        return [f"setup: compiled decode graphs for every bucket up to {cost.max_bs}: none measured (why: under skipped or FAILED below)"]
    buckets = setups[0].num_buckets
    lines = [
        f"setup: compiled decode graphs for all {buckets} buckets up to {cost.max_bs}, cold Inductor/Triton caches",
        f"{'setup':<30}  {'sizes':>5}  {'setup s':>8}  {'compiles':>8}  {'pool MiB':>8}  all {buckets} buckets",
    ]
    for setup in setups:
        total = f"{setup.setup_s:.2f} s" if setup.extrapolated_s is None else f"{setup.extrapolated_s:.2f} s extrapolated"
        lines.append(
            f"{setup.contender:<30}  {len(setup.sizes):>5}  {setup.setup_s:>8.2f}  {setup.compiles:>8}  "
            f"{_mib(setup.pool_bytes):>8}  {total}"
        )
    for setup in setups:
        line = f"  {setup.contender}: {setup.detail}"
        if setup.extrapolated_s is not None:
            line += (
                f"; measured at sizes {', '.join(map(str, setup.sizes))} only: {setup.setup_s / len(setup.sizes):.2f} s "
                f"per size x {setup.num_buckets} buckets = extrapolated"
            )
        lines.append(line)
    ratios = [_ratio(cost, setup) for setup in setups if setup.contender != FULL_INDUCTOR]
    ratios = [ratio for ratio in ratios if ratio]
    if ratios:
        lines.append(f"{FULL_INDUCTOR} setup / " + "; / ".join(ratios))
    return lines


def _ratio(cost: SetupCost, setup: CompiledSetup) -> str:
    ratio = cost.full_inductor_ratio(setup)
    if ratio is None:
        return ""
    return f"{setup.contender}: {ratio:.2f}x" + (" (extrapolated)" if setup.extrapolated_s is not None else "")


def _prefill_setups(cost: SetupCost) -> list[str]:
    first = cost.prefill[0]
    lines = [
        f"setup: prefill graphs for every default bucket up to {first.max_tokens} tokens ({first.max_requests} requests)",
        f"{'mode':<30}  {'buckets':>7}  {'setup s':>8}  {'compiles':>8}  {'pool MiB':>8}",
    ]
    lines += [
        f"{s.mode:<30}  {s.num_buckets:>7}  {s.setup_s:>8.2f}  {s.compiles:>8}  {_mib(s.pool_bytes):>8}" for s in cost.prefill
    ]
    shares = [s.pool for s in cost.prefill if s.pool is not None]
    if shares:
        lines += ["", *_pool_shares(f"pools: every prefill bucket up to {first.max_tokens} tokens against the largest alone", shares)]
    return lines


def _restarts(cost: SetupCost) -> list[str]:
    """Cold and warm fresh-process setups, and each warm restart against reduce-overhead's."""
    reference = next((r for r in cost.restarts if r.setup == REDUCE_OVERHEAD), None)
    first = cost.restarts[0]
    lines = [
        f"setup in a fresh process, every decode bucket ({first.num_buckets}), cold then a warm restart over the same compile cache directory",
        f"{'setup':<16}  {'cold s':>7}  {'warm s':>7}  {'warm/cold':>9}  {'warm / reduce-overhead warm':>27}  {'process cold s':>14}  {'process warm s':>14}  {'compiles':>8}",
    ]
    for r in cost.restarts:
        versus = r.warm_setup_s / reference.warm_setup_s if reference is not None and reference.warm_setup_s else None
        lines.append(
            f"{r.setup:<16}  {r.cold_setup_s:>7.2f}  {r.warm_setup_s:>7.2f}  {_number(r.warm_setup_s / r.cold_setup_s if r.cold_setup_s else None, '.2f', 'x'):>9}  "
            f"{_number(versus, '.2f', 'x'):>27}  {r.cold_process_s:>14.2f}  {r.warm_process_s:>14.2f}  {r.cold_compiles:>4}/{r.warm_compiles:<3}"
        )
    for r in cost.restarts:
        if r.stored_forward_alone_s is not None:
            lines.append(
                f"{r.setup} warm restart: {r.warm_setup_s:.2f} s; its stored forward alone, loaded and called once in a "
                f"fresh process with no runner and no graph, {r.stored_forward_alone_s:.2f} s (torch's imports, device "
                f"libraries, kernel loads: what any restart of this compile pays); the difference, graphhal's mode check "
                f"and captures of every bucket, {r.warm_setup_s - r.stored_forward_alone_s:+.2f} s"
            )
    return lines


def _against_transformers(rows: list[Row]) -> list[str]:
    """For a transformers model: graphhal's full graphs against transformers' own decode steps, per batch size."""
    by_size: dict[int, dict[str, float]] = {}
    for row in rows:
        by_size.setdefault(row.batch_size, {})[row.mode] = row.median_ms
    lines = []
    for batch_size, times in sorted(by_size.items()):
        parts = []
        for ours, theirs in ((GraphMode.FULL.value, TRANSFORMERS_EAGER), (FULL_INDUCTOR, TRANSFORMERS_STATIC_COMPILE)):
            if ours in times and theirs in times:
                parts.append(f"{theirs} / {ours} = {times[theirs] / times[ours]:.2f}x")
        if parts:
            lines.append(f"  batch {batch_size:>4}: " + "; ".join(parts))
    return ["", "against transformers' own decode steps (their step time over graphhal's: above 1x, graphhal is faster):", *lines] if lines else []


def _setup_cost(cost: SetupCost) -> list[str]:
    lines = _compiled_setups(cost) if cost.max_bs is not None else []
    if cost.restarts:
        lines += [""] * bool(lines) + _restarts(cost)
    if cost.prefill:
        lines += [""] * bool(lines) + _prefill_setups(cost)
    return lines + cost.notes


def render(result: BenchResult) -> str:
    return render_step_tables(result) + "\n" + render_after_step_tables(result)


def render_step_tables(result: BenchResult) -> str:
    """The header and the decode and prefill step-time tables: the main result, printable before the rest."""
    return "\n".join(text for text in (render_step_table_part(result, part) for part in _STEP_TABLE_PARTS) if text)


def render_step_table_part(result: BenchResult, part: str) -> str:
    """One part of ``render_step_tables`` (``run_bench`` announces each as it is known): the header, a
    phase's table (empty text for a phase with no rows), or the legend."""
    header = result.header
    if part == STEP_TABLE_HEADER:
        timer = header.timer
        return "\n".join([
            f"graphhal bench on {header.device} ({header.device_name}), torch {header.torch_version}",
            header.description,
            f"timing: median per step by {header.clock}; repeats x steps per repeat shown per row, repeated until the "
            f"median's standard error is under {timer['target_rel_error'] * 100:g}% (or {timer['max_repeats']} repeats, "
            f"or {timer['budget_s']:g} s)",
        ])
    if part in _STEP_COLUMNS:
        rows = result.phase_rows(part)
        return "\n".join(["", part, *_table(rows, _STEP_COLUMNS[part])]) if rows else ""
    if part == STEP_TABLE_LEGEND:
        lines = _against_transformers(result.phase_rows(DECODE))
        if header.modes:
            lines += ["", *(f"  {mode}: {detail}" for mode, detail in header.modes.items())]
        return "\n".join(lines)
    raise ValueError(f"render_step_table_part: no part {part!r}; the parts are {', '.join(map(repr, _STEP_TABLE_PARTS))}")


def render_after_step_tables(result: BenchResult) -> str:
    """Capture and setup costs, what was skipped or failed, notes, and how long the run took."""
    lines = []
    if result.capture_cost is not None:
        lines += ["", *_capture_cost(result.capture_cost)]
    if result.setup_cost is not None:
        lines += ["", *_setup_cost(result.setup_cost)]
    if result.skipped:
        lines += ["", "skipped:", *(f"  {s.phase} {s.mode}: {s.reason}" for s in result.skipped)]
    if result.failed:
        lines += ["", "FAILED:", *(f"  {f.phase} {f.mode} @ {f.size}: {f.error}" for f in result.failed)]
    if result.notes:
        lines += ["", *(f"note: {note}" for note in result.notes)]
    lines.append(f"bench took {result.wall_s:.0f} s")
    return "\n".join(lines)
