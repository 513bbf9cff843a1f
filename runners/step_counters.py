"""What a runner did, counted cheaply enough to stay on: replays per bucket, eager runs and why, padded rows
against live ones, address checks and their time; with the capture report, ``runner.stats()``.

A graph that is silently off is the complaint engines hear most (vLLM PR 47460, SGLang's auto-disabling,
llama.cpp 19345): so the first eager run for each reason is logged at WARNING (at INFO for mode disabled, which
the server asked for), whether counting is on or not, and the counts say how often it happened since.

Per step the counting is one attribute test, a dict update and two additions (the bench measures its cost
against the same steps uncounted: ``graphhal.bench.counters_cost``); ``counting = False`` turns it off.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from runners.capture_report import CaptureReport
from runners.graph_dispatch import Dispatch, EagerReason

logger = logging.getLogger(__name__)

REFUSED = "refused: eager fallback off"  # a batch the graphs cannot hold, refused rather than run eagerly


class StepCounters:
    """One runner's counts since it was made (or ``reset``)."""

    def __init__(self, phase: str) -> None:
        self.phase = phase
        self.enabled = True
        self._told: set[str] = set()  # eager reasons already logged: each is logged once
        self.reset()

    def reset(self) -> None:
        self.replays: dict[int, int] = {}  # by bucket
        self.eager: dict[str, int] = {}  # by reason (EagerReason's text, or REFUSED)
        self.live_rows = 0  # rows the server passed, over every replay
        self.padded_rows = 0  # rows the replays ran beyond those (the bucket's padding): waste
        self.eager_padded_rows = 0  # idle or padded rows of eager runs padded to another rank's batch
        self.address_checks = 0
        self.address_check_seconds = 0.0

    def dispatched(self, dispatch: Dispatch, live_rows: int) -> None:
        """Count one step as dispatched (a replay of ``dispatch.key``, or an eager run and why)."""
        bucket = dispatch.key
        if bucket is not None:
            if self.enabled:
                self.replays[bucket] = self.replays.get(bucket, 0) + 1
                self.live_rows += live_rows
                self.padded_rows += bucket - live_rows
            return
        reason = str(dispatch.reason)
        if reason not in self._told:
            self._tell(reason, f"{live_rows} rows")
        if self.enabled:
            self.eager[reason] = self.eager.get(reason, 0) + 1
            self.eager_padded_rows += max(dispatch.rows - live_rows, 0)

    def refused(self, why: str) -> None:
        if REFUSED not in self._told:
            self._tell(REFUSED, why)
        if self.enabled:
            self.eager[REFUSED] = self.eager.get(REFUSED, 0) + 1

    def timed_check(self, check: Callable[[str], None], what: str) -> None:
        """Run an address check (``AddressWatch.check``) and count it with its time."""
        if not self.enabled:
            return check(what)
        began = time.perf_counter()
        check(what)
        self.address_checks += 1
        self.address_check_seconds += time.perf_counter() - began

    def _tell(self, reason: str, detail: str) -> None:
        self._told.add(reason)
        level = logging.INFO if reason == EagerReason.DISABLED else logging.WARNING
        logger.log(
            level, "graphhal %s: a step ran without graphs (%s; %s); counted in runner.stats()['eager'], logged once",
            self.phase, reason, detail,
        )

    def as_dict(self, report: CaptureReport | None, mode: dict[str, str]) -> dict[str, Any]:
        replayed = self.live_rows + self.padded_rows
        return {
            "phase": self.phase,
            **mode,
            "counting": self.enabled,
            "replays": dict(sorted(self.replays.items(), reverse=True)),
            "eager": dict(self.eager),
            "live_rows": self.live_rows,
            "padded_rows": self.padded_rows,
            "padding_fraction": self.padded_rows / replayed if replayed else 0.0,
            "eager_padded_rows": self.eager_padded_rows,
            "address_checks": self.address_checks,
            "address_check_seconds": self.address_check_seconds,
            **_capture_stats(report),
        }


def _capture_stats(report: CaptureReport | None) -> dict[str, Any]:
    if report is None:
        return {"captured": 0}
    return {
        "captured": len(report.buckets),
        "capture_seconds": report.seconds,
        "capture_seconds_by_bucket": dict(zip(report.buckets, report.bucket_seconds)),
        "pool_bytes": report.pool_bytes,
        "pool_bytes_by_bucket": report.bucket_bytes(),
        "device_bytes": report.device_total_bytes,
        "device_bytes_by_bucket": report.bucket_device_bytes(),
    }


class RunnerStats:
    """What ``BucketedRunner`` gets from its counters: ``stats()``, ``log_stats()``, ``counting``."""

    counters: StepCounters
    report: CaptureReport | None

    def stats(self) -> dict[str, Any]:
        """Everything counted since the runner was made, with what its capture took, as a plain dict:

        replays (by bucket), eager (runs by reason, and refusals), live_rows, padded_rows and
        padding_fraction (of replayed rows), address_checks and their seconds, captured (buckets),
        capture_seconds (and by bucket), pool_bytes and device_bytes (and by bucket), mode and why."""
        mode = {"mode": str(self.config.mode), "requested_mode": str(self.requested_mode), "mode_reason": self.mode_reason}  # type: ignore[attr-defined]
        return self.counters.as_dict(self.report, mode)

    def log_stats(self, level: int = logging.INFO) -> dict[str, Any]:
        """Log ``stats()`` as one line (at ``level``) and return it."""
        stats = self.stats()
        logger.log(level, "graphhal %s stats: %s", self.counters.phase, stats)
        return stats

    @property
    def counting(self) -> bool:
        """Whether steps are counted (default True). Eager runs are logged either way."""
        return self.counters.enabled

    @counting.setter
    def counting(self, on: bool) -> None:
        self.counters.enabled = bool(on)
