"""How many device graphs a capture may make: fewer buckets, or a refusal with the numbers, where a device holds
only so many graphs at once (``Device.graph_budget``; an Ascend device's ACL graphs each hold one of its
about 2,048 streams).

The graphs one bucket takes are counted while the largest bucket is captured (one for ``full``, one per
segment for ``breakable``, one per piece between splitting ops for ``piecewise``: about the layer count), so the
count is the capture's own, not a guess. Where the buckets would need more than the device has left, the
runner's default buckets are thinned (the largest and the smallest kept, the rest spread evenly between) and the
capture report says so; buckets the caller chose are never silently dropped: the capture is refused, with the
count, the budget and what would fit.
"""

from __future__ import annotations

import logging

import hal
from runners.config import PhaseConfig

logger = logging.getLogger(__name__)


class GraphBudgetError(hal.GraphHalError, ValueError):
    """The buckets a runner was asked to capture need more device graphs than the device can hold."""


def spread(order: list[int], keep: int) -> list[int]:
    """``keep`` of ``order`` (largest first): the largest, the smallest, and the rest evenly between."""
    if keep >= len(order):
        return list(order)
    if keep <= 1:
        return order[:1]
    step = (len(order) - 1) / (keep - 1)
    return sorted({order[round(i * step)] for i in range(keep)}, reverse=True)


def fit_to_budget(order: list[int], per_bucket: int, budget: int | None, config: PhaseConfig, device: str) -> list[int]:
    """The buckets to capture (largest first) given ``per_bucket`` graphs each and ``budget`` graphs the device had
    left before the largest was captured (None: no limit), for a runner of ``config`` on ``device``."""
    if budget is None or per_bucket == 0 or per_bucket * len(order) <= budget:
        return order
    chosen = config.buckets != config.default_buckets(order[0])  # the caller's buckets, not the defaults
    phase, mode = config.phase, config.mode
    fits = budget // per_bucket
    numbers = (
        f"{len(order)} {phase} buckets in mode {mode} need {per_bucket * len(order)} graphs on {device} "
        f"({per_bucket} per bucket), which has room for {budget} more"
    )
    why = (
        "; each graph holds one of the device's streams (an Ascend device has about 2,048, shared by every graph "
        "of the process and its collectives)"
    )
    if fits < 1:
        raise GraphBudgetError(f"{numbers}: not even one bucket fits{why}. {_remedy(mode)}")
    if chosen:
        raise GraphBudgetError(
            f"{numbers}{why}. Capture at most {fits} buckets (for instance {spread(order, fits)[::-1]}), "
            f"or {_remedy(mode)[0].lower()}{_remedy(mode)[1:]}"
        )
    kept = spread(order, fits)
    logger.warning("graphhal: %s: capturing %d of them, %s%s", numbers, len(kept), kept[::-1], why)
    return kept


def _remedy(mode: str) -> str:
    if mode in (hal.GraphMode.PIECEWISE, hal.GraphMode.BREAKABLE):
        return (
            f"Mode {mode} takes a graph per piece between attention calls: mode full takes one graph per bucket, "
            "or lower max_bs/max_tokens"
        )
    return "Lower max_bs/max_tokens, or free the graphs of other runners on this device first"
