"""The bench's timing primitive: median seconds per step, repeated until the median is stable.

One sample issues ``steps`` calls back to back and drains the device queue only at the ends, as a server
issues its steps: on devices that queue work this measures launches plus kernels, not one step's latency
with a host round trip added. The clock is ``torch.cuda.Event`` pairs on CUDA (device time between the
first launch and the last kernel) and ``perf_counter`` around a device synchronize everywhere else.

How many samples: at least ``min_repeats``, then more until the estimated standard error of the median is
below ``target_rel_error`` of it (or ``max_repeats``, or the time budget, is reached). At the default 1 %,
two runs' medians differ by about 1.4 % (one standard error of the difference).

Steps compared with each other are timed together (``time_together``): one sample of each in turn, round
after round. Measured one after another, a contender timed while the machine was busier (another process,
clocks) would look slower than one timed a second earlier; interleaved, they all see the same machine, so
their ratios hold even where absolute times drift between runs.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

import hal

# sigma ~ 1.4826 * MAD for normal data; the median's standard error is ~1.2533 * sigma / sqrt(n).
_MAD_TO_SIGMA = 1.4826
_MEDIAN_SE_FACTOR = 1.2533


@dataclass(frozen=True)
class TimerSettings:
    """How hard a ``StepTimer`` tries; see the module docstring for the stopping rule.

    steps_per_repeat: fixed steps per sample; None picks enough that one sample lasts ``min_sample_s``
                      (short samples are dominated by the clock's own resolution and the final sync).
    budget_s:         wall time per measurement after which it stops at ``min_repeats`` or more samples,
                      stable or not (the reported ``rel_error`` then says how stable it got).
    """

    target_rel_error: float = 0.01
    min_repeats: int = 5
    max_repeats: int = 50
    steps_per_repeat: int | None = None
    min_sample_s: float = 0.02
    budget_s: float = 3.0
    warmup_steps: int = 3

    def __post_init__(self) -> None:
        if not 1 <= self.min_repeats <= self.max_repeats:
            raise ValueError(f"need 1 <= min_repeats ({self.min_repeats}) <= max_repeats ({self.max_repeats})")
        if self.steps_per_repeat is not None and self.steps_per_repeat < 1:
            raise ValueError(f"steps_per_repeat must be positive, got {self.steps_per_repeat}")
        if self.target_rel_error <= 0 or self.min_sample_s <= 0 or self.budget_s < 0 or self.warmup_steps < 0:
            raise ValueError(f"timer settings out of range: {self}")


@dataclass(frozen=True)
class Timing:
    """A measurement: the median over ``repeats`` samples of the mean seconds per step of each sample."""

    median_s: float
    repeats: int
    steps_per_repeat: int
    rel_error: float  # estimated standard error of the median, relative to it
    samples_s: tuple[float, ...]


def median_rel_error(samples: Sequence[float]) -> float:
    """Estimated standard error of the median of ``samples``, relative to the median (robust to outliers)."""
    median = statistics.median(samples)
    if len(samples) < 2 or median <= 0:
        return math.inf
    mad = statistics.median(abs(s - median) for s in samples)
    return _MEDIAN_SE_FACTOR * _MAD_TO_SIGMA * mad / math.sqrt(len(samples)) / median


class _HostClock:
    name = "perf_counter + synchronize"

    def __init__(self, device: hal.Device) -> None:
        self.device = device

    def sample(self, step: Callable[[], Any], steps: int) -> float:
        self.device.synchronize()  # nothing queued before the sample may land inside it
        started = time.perf_counter()
        for _ in range(steps):
            step()
        self.device.synchronize()
        return (time.perf_counter() - started) / steps


class _CudaEventClock:
    name = "torch.cuda.Event"

    def __init__(self, device: hal.Device) -> None:
        self.device = device
        self.torch_device = device.torch_device

    def sample(self, step: Callable[[], Any], steps: int) -> float:
        # Events on the current stream: graph replays and eager kernels both launch there. The sync before
        # the start event keeps queued work of an earlier sample from being counted in this one.
        torch.cuda.synchronize(self.torch_device)
        stream = torch.cuda.current_stream(self.torch_device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(steps):
            step()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / steps


class StepTimer:
    """Times zero-argument step callables on one device with the clock that device needs."""

    def __init__(self, device: hal.Device, settings: TimerSettings | None = None) -> None:
        self.settings = settings or TimerSettings()
        self._clock = _CudaEventClock(device) if device.torch_device.type == "cuda" else _HostClock(device)

    @property
    def clock_name(self) -> str:
        return self._clock.name

    def time(self, step: Callable[[], Any]) -> Timing:
        timing = self.time_together({"step": step})["step"]
        if isinstance(timing, Exception):
            raise timing
        return timing

    def time_together(self, steps: Mapping[str, Callable[[], Any]]) -> dict[str, Timing | Exception]:
        """Time every step, interleaved: round after round, one sample of each.

        All steps take part in every round until all of them are stable (or ``max_repeats`` rounds, or the
        budget of ``budget_s`` per step after ``min_repeats`` rounds): a step that stopped early would have
        its samples from a different stretch of time than the others, which is what interleaving avoids.
        A step that raises is dropped and its exception returned in its place; the others go on.
        """
        settings = self.settings
        failed: dict[str, Exception] = {}
        steps_per_sample: dict[str, int] = {}
        for name, step in steps.items():
            try:
                for _ in range(settings.warmup_steps):
                    step()
                steps_per_sample[name] = settings.steps_per_repeat or self._calibrate(step)
            except Exception as exc:
                failed[name] = exc
        samples: dict[str, list[float]] = {name: [] for name in steps_per_sample}
        deadline = time.perf_counter() + settings.budget_s * len(samples)
        for done in range(1, settings.max_repeats + 1):
            for name in [n for n in samples if n not in failed]:
                try:
                    samples[name].append(self._clock.sample(steps[name], steps_per_sample[name]))
                except Exception as exc:
                    failed[name] = exc
            running = [samples[n] for n in samples if n not in failed]
            if done >= settings.min_repeats and (
                time.perf_counter() > deadline or all(median_rel_error(s) <= settings.target_rel_error for s in running)
            ):
                break
        results: dict[str, Timing | Exception] = dict(failed)
        for name, taken in samples.items():
            if name not in failed:
                results[name] = Timing(
                    statistics.median(taken), len(taken), steps_per_sample[name], median_rel_error(taken), tuple(taken)
                )
        return {name: results[name] for name in steps}

    def _calibrate(self, step: Callable[[], Any]) -> int:
        """Steps per sample so that one sample lasts ``min_sample_s`` (the fastest of three single steps)."""
        one_step = min(self._clock.sample(step, 1) for _ in range(3))
        return max(1, min(10_000, math.ceil(self.settings.min_sample_s / max(one_step, 1e-9))))
