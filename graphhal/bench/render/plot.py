"""The bench result as a PNG: decode step time and speedup over eager against batch size, one line per mode.

matplotlib is an optional extra (``pip install 'graphhal[plot]'``), imported only when a plot is asked for.
"""

from __future__ import annotations

from pathlib import Path

from graphhal.bench.names import DECODE
from graphhal.bench.results import BenchResult, Row


class PlotUnavailableError(RuntimeError):
    """--plot was asked for but matplotlib is not installed."""


def require_matplotlib():
    """matplotlib's pyplot on the file-only Agg backend, or PlotUnavailableError saying how to install it."""
    try:
        import matplotlib
    except ImportError as exc:
        raise PlotUnavailableError(
            "--plot needs matplotlib, an optional extra: pip install 'graphhal[plot]' (or pip install matplotlib)"
        ) from exc
    matplotlib.use("Agg")  # files only: no display, no GUI toolkit needed
    import matplotlib.pyplot as plt

    return plt


def _by_mode(rows: list[Row]) -> dict[str, list[Row]]:
    lines: dict[str, list[Row]] = {}
    for row in rows:
        lines.setdefault(row.mode, []).append(row)
    return lines


def write_plot(result: BenchResult, path: Path) -> None:
    plt = require_matplotlib()
    rows = result.phase_rows(DECODE)
    figure, (latency, speedup) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for mode, mode_rows in _by_mode(rows).items():
        mode_rows = sorted(mode_rows, key=lambda r: r.batch_size or 0)
        sizes = [r.batch_size for r in mode_rows]
        latency.plot(sizes, [r.median_ms for r in mode_rows], marker="o", label=mode)
        speedups = [(r.batch_size, r.speedup_vs_eager) for r in mode_rows if r.speedup_vs_eager is not None]
        if speedups:
            speedup.plot(*zip(*speedups), marker="o", label=mode)
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    sizes = sorted({r.batch_size for r in rows if r.batch_size is not None})
    for axes, title, unit in ((latency, "decode step time", "ms / step"), (speedup, "speedup over eager", "x eager")):
        axes.set_xscale("log", base=2)
        if sizes:  # label the measured batch sizes themselves, not powers of two
            axes.xaxis.set_major_locator(FixedLocator(sizes))
            axes.xaxis.set_minor_locator(NullLocator())
            axes.xaxis.set_major_formatter(ScalarFormatter())
        axes.set_xlabel("batch size")
        axes.set_ylabel(unit)
        axes.set_title(title)
        axes.grid(True, which="both", alpha=0.3)
        if axes.lines:  # no decode rows (all failed or skipped): an empty panel, not a legend warning
            axes.legend()
    latency.set_yscale("log")
    speedup.axhline(1.0, color="grey", linewidth=0.8)
    header = result.header
    figure.suptitle(f"graphhal bench: {header.device} ({header.device_name}), torch {header.torch_version}", fontsize=10)
    figure.savefig(path, dpi=120)
    plt.close(figure)
