"""One measurement after another: each apart in memory, its failure recorded, the run going on.

``size`` sets up every contender of one size in turn (its setup time and pool read right after its own
setup), checks its first output against eager's, then times them all together, interleaved (see
``timing``), so their ratios do not depend on when each happened to run. ``attempt`` runs one setup
measurement. One that raises is recorded as failed: one broken mode must not cost the other measurements.

Either way it runs apart (``measured_apart``): what an earlier measurement set up is released before it is
set up, and what it set up is released after it. The harness releases memory nowhere else, but between the
two captures of the capture cost, which must not share memory either. Apart, a setup time or a pool is the
measurement's own. Releasing also forgets every torch.compile result and cudagraph tree, so each size's
compiled contenders compile afresh (Inductor's on-disk caches still make later sizes faster) and per-size
recompiles never reach dynamo's recompile limit, past which it silently runs the step eagerly; so it must
never happen while something set up before it may still run.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Callable, Iterator, TypeVar

import torch
from tqdm import tqdm

import hal
from graphhal.bench.agreement import detached_copy, max_abs_difference
from graphhal.bench.contenders import Prepared
from graphhal.bench.names import EAGER
from graphhal.bench.results import BenchResult, Failed, Row
from graphhal.bench.timing import StepTimer, Timing

T = TypeVar("T")
# (mode, prepare) pairs of one size, eager first when present: its output is the reference.
Contenders = list[tuple[str, Callable[[], Prepared]]]


def release_memory(device: hal.Device) -> None:
    """Free what finished measurements held and forget everything torch.compile compiled."""
    torch._dynamo.reset()
    if device.torch_device.type == "cuda":
        # Graphs and their pools can sit in reference cycles; only a collection returns their memory to the
        # allocator. Elsewhere it is skipped: with torch loaded one collection takes ~0.25 s on a small CPU,
        # and pool sizes there are counted per pool, not read from an allocator.
        gc.collect()
        torch.cuda.empty_cache()


@contextlib.contextmanager
def measured_apart(device: hal.Device) -> Iterator[None]:
    """One measurement with nothing of another alive: released before it is set up and after it ends, failed or
    not. What it set up must be unreachable when the block ends (held by a function that has returned)."""
    release_memory(device)
    try:
        yield
    finally:
        release_memory(device)


class Measurements:
    """What a run's measurements share: the device, the timer, the progress bar, and the result they fill in."""

    def __init__(self, device: hal.Device, timer: StepTimer, result: BenchResult, bar: tqdm) -> None:
        self.device = device
        self.timer = timer
        self.result = result
        self.bar = bar

    def size(self, phase: str, size: dict[str, int], contenders: Contenders, *, record: bool = True) -> list[Row]:
        """Rows of the contenders of one size that did not fail, appended to the result unless ``record`` is off."""
        with measured_apart(self.device):
            rows, timings = self._set_up_and_time(phase, size, contenders)
        measured = []
        for mode, timing in timings.items():
            if isinstance(timing, Exception):
                self.failed(phase, mode, rows[mode].size_label, timing)
                continue
            rows[mode].set_timing(timing)
            measured.append(rows[mode])
        if record:
            self.result.rows.extend(measured)
            self.advance(len(contenders))
        return measured

    def _set_up_and_time(
        self, phase: str, size: dict[str, int], contenders: Contenders
    ) -> tuple[dict[str, Row], dict[str, Timing | Exception]]:
        """Each contender prepared and its first output checked against eager's, then all timed together.

        What was prepared lives only in here: once this returns, nothing holds this size's graphs.
        """
        prepared: dict[str, Prepared] = {}
        rows: dict[str, Row] = {}
        expected = None
        for mode, prepare in contenders:
            row = Row(phase, mode, **size)
            self.describe(f"{phase} @ {row.size_label}: setting up {mode}")
            try:
                ready = prepare()
                first = detached_copy(ready.run())
                if mode == EAGER:
                    expected = first
                elif expected is not None and ready.compares:
                    row.max_abs_diff = max_abs_difference(first, expected)
            except Exception as exc:  # recorded and printed; the command exits non-zero
                self.failed(phase, mode, row.size_label, exc)
                continue
            row.setup_s, row.pool_bytes = ready.setup_s, ready.pool_bytes
            prepared[mode], rows[mode] = ready, row
        self.describe(f"{phase} @ {Row(phase, EAGER, **size).size_label}: timing {len(prepared)} together")
        return rows, self.timer.time_together({mode: ready.run for mode, ready in prepared.items()})

    def attempt(self, phase: str, mode: str, size: str, measure: Callable[[], T]) -> T | Failed:
        """What ``measure()`` returns, or, when it raised, the failure recorded for ``mode`` at ``size``."""
        try:
            with measured_apart(self.device):
                return measure()
        except Exception as exc:  # recorded and printed; the command exits non-zero
            return self.failed(phase, mode, size, exc)

    def failed(self, phase: str, mode: str, size: str, exc: Exception) -> Failed:
        failure = Failed(phase, mode, size, f"{type(exc).__name__}: {exc}")
        self.result.failed.append(failure)
        return failure

    def describe(self, text: str) -> None:
        """What the progress bar says is happening now."""
        self.bar.set_description_str(text)

    def advance(self, cases: int) -> None:
        self.bar.update(cases)
