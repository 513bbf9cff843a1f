"""Which graph a batch runs on, decided in one place: the key (bucket), graph or eager, and why.

vLLM's ``CudagraphDispatcher`` is the model: the run path asks once per step and trusts the answer, so a new
kind of step (several tokens per request, several draft lengths) adds keys here rather than branches there.
Across the ranks of a consensus group the answer is taken from what every rank reported (the largest batch,
the ranks whose batch does not fit), so every rank reaches the same one.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from runners.buckets import BucketPolicy


class EagerReason(str, Enum):
    """Why a step runs eagerly instead of replaying a graph (a ``str`` enum: logs and counters keep the text)."""

    DISABLED = "mode disabled"
    TOO_LARGE = "batch larger than the graphs hold"  # over the largest bucket, or more requests than captured
    ANOTHER_RANK = "another rank's batch does not fit the graphs"  # data parallel: every rank runs eagerly

    __str__ = str.__str__
    __format__ = str.__format__


@dataclass(frozen=True)
class Dispatch:
    """How one step runs.

    key:    the bucket whose graph replays; None to run eagerly.
    rows:   the rows the step runs with: the bucket for a graph; eagerly, the largest batch across the ranks
            of a consensus group (this rank's own rows without one), so collectives see equal shapes.
    reason: why eagerly (None for a graph).
    """

    key: int | None
    rows: int
    reason: EagerReason | None = None


class GraphDispatcher:
    """Decides, per step, between the captured graphs and an eager run.

    buckets:         the runner's buckets (the key of a graph is its bucket).
    captures_graphs: False in mode ``disabled``: every step runs eagerly through the same API.
    eager_fallback:  a batch the graphs cannot hold runs eagerly (True) or is refused (False).
    across_ranks:    the runner agrees on every step with a consensus group (refusals say so).
    """

    def __init__(self, buckets: BucketPolicy, *, captures_graphs: bool, eager_fallback: bool, across_ranks: bool) -> None:
        self.buckets = buckets
        self.captures_graphs = captures_graphs
        self.eager_fallback = eager_fallback
        self.across_ranks = across_ranks
        self._graph_dispatches: dict[int, Dispatch] = {}  # one frozen Dispatch per bucket, made once

    def decide(self, largest: int, misfits: list[int], misfit_here: str | None, counters: Any = None) -> Dispatch:
        """The step's dispatch from the largest batch across ranks (this rank's own without a group), the ranks
        whose batch does not fit, and what does not fit here (None when this rank's batch fits). A refusal is
        counted in ``counters`` (``runners.step_counters``) before it is raised."""
        if misfits:
            if not self.eager_fallback:
                refusal = self._refusal(misfits, misfit_here)
                if counters is not None:
                    counters.refused(refusal)
                raise ValueError(refusal)
            return Dispatch(None, largest, EagerReason.TOO_LARGE if misfit_here else EagerReason.ANOTHER_RANK)
        if not self.captures_graphs:
            return Dispatch(None, largest, EagerReason.DISABLED)
        bucket = self.buckets.bucket_for(max(largest, 1))  # an idle step of every rank still replays the smallest
        dispatch = self._graph_dispatches.get(bucket)
        if dispatch is None:
            dispatch = self._graph_dispatches[bucket] = Dispatch(bucket, bucket)
        return dispatch

    def _refusal(self, misfits: list[int], misfit_here: str | None) -> str:
        if not self.across_ranks:
            return f"{misfit_here} and eager fallback is off; split the batch"
        here = f"; here: {misfit_here}" if misfit_here else ""
        return (
            f"the batch of rank(s) {', '.join(map(str, misfits))} of the consensus group does not fit the graphs "
            f"and eager fallback is off{here}; every rank refuses this step"
        )
