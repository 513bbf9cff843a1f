"""The bench result as text for the terminal: header, one table per phase, capture cost, what was skipped."""

from __future__ import annotations

from typing import Callable

from hal import MIB
from graphhal_cli.bench.results import BenchResult, CaptureCost, Row

# (title, width, cell) per column; a cell is "-" where the value does not apply.
_Column = tuple[str, int, Callable[[Row], str]]


def _number(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _timing(row: Row) -> str:
    return f"{row.repeats}x{row.steps_per_repeat} ±{row.rel_error * 100:.1f}%"


_SHARED: list[_Column] = [
    ("mode", 15, lambda r: r.mode),
    ("ms/step", 9, lambda r: f"{r.median_ms:.3f}"),
    ("vs eager", 8, lambda r: _number(r.speedup_vs_eager, ".2f", "x")),
    ("/ floor", 7, lambda r: _number(r.ratio_to_floor, ".2f", "x")),
    ("setup s", 7, lambda r: _number(r.setup_s, ".2f")),
    ("pool MiB", 8, lambda r: _number(None if r.pool_bytes is None else r.pool_bytes / MIB, ".1f")),
    ("max|Δ|", 8, lambda r: _number(r.max_abs_diff, ".2g")),
    ("repeats x steps", 17, _timing),
]
_DECODE: list[_Column] = [("batch", 5, lambda r: str(r.batch_size)), *_SHARED]
_PREFILL: list[_Column] = [("tokens", 6, lambda r: str(r.tokens)), ("reqs", 4, lambda r: str(r.requests)), *_SHARED]


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
            f"one break: {cost.break_cost_us:.1f} us  (batch 1: breakable {cost.breakable_bs1_ms:.3f} ms vs full "
            f"{cost.full_bs1_ms:.3f} ms, {cost.breaks} breaks per step)"
        )
    if cost.note:
        lines.append(cost.note)
    return lines


def render(result: BenchResult) -> str:
    header = result.header
    timer = header.timer
    lines = [
        f"graphhal bench on {header.device} ({header.device_name}), torch {header.torch_version}",
        header.description,
        f"timing: median per step by {header.clock}; repeats x steps per repeat shown per row, repeated until the "
        f"median's standard error is under {timer['target_rel_error'] * 100:g}% (or {timer['max_repeats']} repeats, "
        f"or {timer['budget_s']:g} s)",
    ]
    for phase, columns in (("decode", _DECODE), ("prefill", _PREFILL)):
        rows = result.phase_rows(phase)
        if rows:
            lines += ["", phase, *_table(rows, columns)]
    if header.modes:
        lines += ["", *(f"  {mode}: {detail}" for mode, detail in header.modes.items())]
    if result.capture_cost is not None:
        lines += ["", *_capture_cost(result.capture_cost)]
    if result.skipped:
        lines += ["", "skipped:", *(f"  {s.phase} {s.mode}: {s.reason}" for s in result.skipped)]
    if result.failed:
        lines += ["", "FAILED:", *(f"  {f.phase} {f.mode} @ {f.size}: {f.error}" for f in result.failed)]
    if result.notes:
        lines += ["", *(f"note: {note}" for note in result.notes)]
    lines.append(f"bench took {result.wall_s:.0f} s")
    return "\n".join(lines)
