"""A plan of what graphs will take from the device, made before the real KV cache exists.

A server starts in this order: load the weights; plan (capture every bucket once on runners built over a
small stand-in KV cache, measure what the device gave, close them); size the KV cache from what is left; build
the real runners over it and capture. What a graph takes does not depend on how many blocks the cache has
(attention reads block tables of a fixed width, not the whole cache), so the stand-ins' capture is the real
one's, measured device-wide: graph objects, executable graphs and communicators' buffers included, which a
pool estimate leaves out and which shrank vLLM's KV cache 3.1x when it extrapolated instead (vLLM 45178).

    plan = plan_graph_memory([standin_prefill, standin_decode])    # captured, measured, closed
    cache_bytes = plan.cache_bytes(headroom_bytes=...)            # what is left for the KV cache
    ...                                                             # the real cache, the real runners
    plan.check([prefill.capture(), decode.capture()])              # measured against the plan

A budget (``pool_budget_mib``) in a stand-in's config stops its capture after the largest bucket, as it does
in a real capture: the plan raises ``PoolBudgetError`` before anything more is captured.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any, Sequence

import hal
from runners.capture_report import CaptureReport
from runners.thread_owner import ThreadOwner


class MemoryPlanError(hal.GraphHalError, ValueError):
    """A memory plan cannot be made (the device does not report free memory) or was not kept."""


@dataclass(frozen=True)
class MemoryPlan:
    """What each stand-in runner's capture took, device-wide and from its pool.

    reports:          the stand-ins' capture reports, in the order they captured (their phases name them).
    free_bytes:       the device's free memory once the stand-ins were closed and cached memory released.
    """

    reports: tuple[CaptureReport, ...]
    free_bytes: int

    @property
    def device_bytes(self) -> int:
        """Device-wide bytes every bucket of every runner will take: the estimate a server plans with."""
        return sum(report.device_total_bytes or 0 for report in self.reports)

    @property
    def pool_bytes(self) -> int:
        """What the pools' share of it is (the rest: graph objects and what else sits outside the pools)."""
        return sum(sum(report.added_bytes) for report in self.reports)

    def cache_bytes(self, headroom_bytes: int = 0) -> int:
        """Bytes left for the KV cache: free memory less what the graphs will take and ``headroom_bytes``
        (activations of eager steps, fragmentation: the server's own margin). Never below 0."""
        if headroom_bytes < 0:
            raise ValueError(f"headroom_bytes must be >= 0, got {headroom_bytes}")
        return max(self.free_bytes - self.device_bytes - headroom_bytes, 0)

    def compare(self, reports: Sequence[CaptureReport]) -> dict[str, tuple[int, int]]:
        """(estimated, measured) device-wide bytes per phase, and ``"all"`` for the sum, from the real
        runners' capture reports."""
        planned = _by_phase(self.reports)
        measured = _by_phase(reports)
        if planned.keys() != measured.keys():
            raise MemoryPlanError(
                f"the plan was made for phases {sorted(planned)}, the reports are of {sorted(measured)}: "
                "compare the real runners of the stand-ins the plan captured"
            )
        rows = {phase: (planned[phase], measured[phase]) for phase in planned}
        rows["all"] = (sum(p for p, _ in rows.values()), sum(m for _, m in rows.values()))
        return rows

    def check(self, reports: Sequence[CaptureReport], tolerance: float = 0.05) -> dict[str, tuple[int, int]]:
        """``compare``, raising ``MemoryPlanError`` when the real capture took more than the plan plus
        ``tolerance`` (a fraction) device-wide: the KV cache sized from the plan would not fit."""
        rows = self.compare(reports)
        estimated, measured = rows["all"]
        if measured > estimated * (1 + tolerance):
            raise MemoryPlanError(
                f"the capture took {measured / hal.MIB:.1f} MiB device-wide, the plan said {estimated / hal.MIB:.1f} "
                f"MiB (over by more than {tolerance:.0%}); per phase (plan, measured): "
                + ", ".join(f"{p} {e / hal.MIB:.1f}/{m / hal.MIB:.1f} MiB" for p, (e, m) in rows.items() if p != "all")
                + ". Were the real runners built with the stand-ins' configs and block-table width?"
            )
        return rows

    def summary(self) -> str:
        phases = ", ".join(
            f"{report.phase} {(report.device_total_bytes or 0) / hal.MIB:.1f} MiB (pool {sum(report.added_bytes) / hal.MIB:.1f})"
            for report in self.reports
        )
        return (
            f"graphhal: graphs will take {self.device_bytes / hal.MIB:.1f} MiB device-wide ({phases}); "
            f"{self.free_bytes / hal.MIB:.1f} MiB free before them"
        )


def plan_graph_memory(standins: Sequence[Any], *, share_pool: bool = False) -> MemoryPlan:
    """Capture each stand-in runner in order, measure what each bucket took device-wide, close them all, give
    cached memory back to the device, and return the plan. The stand-ins are closed whatever happens (a
    budget refused, a capture failed).

    share_pool: every stand-in after the first captures into the first one's pool, as the real runners will
                when a server passes ``pool=prefill.pool`` (put the runner with the larger graphs first).
    """
    if not standins:
        raise ValueError("plan_graph_memory needs at least one stand-in runner")
    device = standins[0].device
    if device.memory_stats().device_used_bytes is None:
        raise MemoryPlanError(
            f"device {device} does not report its free memory (hal_memory_stats without device_free_bytes); "
            "a plan measures what the device as a whole gives the graphs, so it needs that"
        )
    reports: list[CaptureReport] = []
    try:
        for runner in standins:
            if share_pool and reports:
                runner._capture.pool = standins[0].pool  # as pool=standins[0].pool at construction would
            reports.append(runner.capture())
    finally:
        for index, runner in enumerate(standins):
            runner.close()
            if share_pool and index:  # joined here, not its own: let the first's pool go (and its owner, keyed by it)
                runner._capture.pool = None
                runner._capture.thread_owner = ThreadOwner().adopting(runner._capture.thread_owner)
        gc.collect()  # once, here, not per capture: the closed graphs' cycles go before the device is read
        device.release_cached_memory()
    free = device.memory_stats().device_free_bytes
    assert free is not None
    return MemoryPlan(tuple(reports), free)


def _by_phase(reports: Sequence[CaptureReport]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for report in reports:
        if report.device_total_bytes is None:
            raise MemoryPlanError(f"the {report.phase} capture report has no device-wide figures; its device does not report free memory")
        totals[report.phase] = totals.get(report.phase, 0) + report.device_total_bytes
    return totals
