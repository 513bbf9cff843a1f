"""What a bench run found, as plain dataclasses: the table, the JSON file and the plot all read these.

They know nothing of how anything was measured: a ``Row`` is one contender at one size, whatever it ran.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from graphhal.bench.names import EAGER, FLOOR, FULL_INDUCTOR
from graphhal.bench.timing import Timing



@dataclass
class Row:
    """One contender at one size. ``batch_size`` is set for decode rows, ``tokens`` and ``requests`` for
    prefill rows (and ``decodes`` for a mixed batch: decodes beside one prompt chunk). Ratios are None where their reference (eager, floor) did not run at that size."""

    phase: str
    mode: str
    batch_size: int | None = None
    tokens: int | None = None
    requests: int | None = None
    decodes: int | None = None  # a mixed batch: this many of the requests decode one token each
    median_ms: float = math.nan
    repeats: int = 0
    steps_per_repeat: int = 0
    rel_error: float = math.nan  # estimated standard error of the median, relative to it
    setup_s: float | None = None  # compile + warm-up + capture; None for eager
    pool_bytes: int | None = None
    max_abs_diff: float | None = None  # largest |output - eager output|; None for eager itself
    speedup_vs_eager: float | None = None  # eager time / this time
    ratio_to_floor: float | None = None  # this time / floor time (1.0 = no runner overhead at all)

    def set_timing(self, timing: Timing) -> None:
        self.median_ms = timing.median_s * 1e3
        self.repeats = timing.repeats
        self.steps_per_repeat = timing.steps_per_repeat
        self.rel_error = timing.rel_error

    @property
    def size_label(self) -> str:
        if self.batch_size is not None:
            return str(self.batch_size)
        if self.decodes:
            return f"mixed: {self.decodes} dec + {self.tokens - self.decodes} tok chunk"
        return f"{self.tokens} tok x{self.requests}"

    def same_size(self, other: "Row") -> bool:
        return (self.phase, self.batch_size, self.tokens, self.requests, self.decodes) == (
            other.phase, other.batch_size, other.tokens, other.requests, other.decodes,
        )


def fill_ratios(rows: list[Row]) -> None:
    """Speedup over eager and ratio to the floor, against the rows of the same phase and size."""
    for row in rows:
        for reference in rows:
            if not reference.same_size(row):
                continue
            if reference.mode == EAGER:
                row.speedup_vs_eager = reference.median_ms / row.median_ms
            elif reference.mode == FLOOR:
                row.ratio_to_floor = row.median_ms / reference.median_ms


@dataclass
class Skipped:
    phase: str
    mode: str
    reason: str


@dataclass
class Failed:
    """A contender that raised while setting up or running; the run goes on and exits non-zero."""

    phase: str
    mode: str
    size: str
    error: str


@dataclass
class PoolShare:
    """One runner's graph pool for all its buckets against its largest bucket captured alone, and the estimate
    the runner made after capturing its largest bucket, before the others."""

    phase: str
    mode: str
    num_buckets: int
    largest: int
    pool_bytes_all: int
    pool_bytes_largest: int
    estimate_bytes: int

    @property
    def ratio(self) -> float | None:
        return self.pool_bytes_all / self.pool_bytes_largest if self.pool_bytes_largest else None

    @property
    def estimate_error(self) -> float | None:
        """(estimate - measured) / measured."""
        return (self.estimate_bytes - self.pool_bytes_all) / self.pool_bytes_all if self.pool_bytes_all else None


@dataclass
class CaptureCost:
    """Capture-only measurements: what a server pays at startup, and the price of one break."""

    max_bs: int
    num_buckets: int
    capture_s: float  # every default decode bucket up to max_bs, mode full, one pool
    pool_bytes_all: int
    pool_bytes_largest: int  # the largest bucket captured alone
    breaks: int | None = None  # break points in one breakable decode step
    full_bs1_ms: float | None = None
    breakable_bs1_ms: float | None = None
    full_bs1_rel_error: float | None = None  # standard error of each median, relative to it
    breakable_bs1_rel_error: float | None = None
    note: str = ""
    pools: list[PoolShare] = field(default_factory=list)  # every decode mode's pool sharing, full included

    @property
    def pool_ratio(self) -> float | None:
        """Pool of all buckets over the largest alone: about 1 when smaller buckets reuse the largest's memory."""
        return self.pool_bytes_all / self.pool_bytes_largest if self.pool_bytes_largest else None

    @property
    def break_cost_us(self) -> float | None:
        """(breakable - full) step time at batch 1, per break, in microseconds."""
        if not self.breaks or self.full_bs1_ms is None or self.breakable_bs1_ms is None:
            return None
        return (self.breakable_bs1_ms - self.full_bs1_ms) * 1e3 / self.breaks

    @property
    def break_cost_error_us(self) -> float | None:
        """The standard error of ``break_cost_us``: the two medians' errors, added in quadrature, per break."""
        if self.break_cost_us is None or self.full_bs1_rel_error is None or self.breakable_bs1_rel_error is None:
            return None
        full = self.full_bs1_ms * self.full_bs1_rel_error  # type: ignore[operator]
        breakable = self.breakable_bs1_ms * self.breakable_bs1_rel_error  # type: ignore[operator]
        return math.hypot(full, breakable) * 1e3 / self.breaks  # type: ignore[operator]


@dataclass
class CompiledSetup:
    """One compiled decode setup covering a server's batch sizes: what it took and how often it compiled.

    Measured on ``sizes`` (in that order); a server needs ``num_buckets`` sizes (every default decode bucket
    up to max_bs). When ``sizes`` is a subset, ``extrapolated_s`` scales the measured mean per size up to all
    buckets: an estimate, labelled as such wherever it is shown.
    """

    contender: str
    detail: str  # what exactly was set up, for the table and the JSON
    sizes: list[int]
    num_buckets: int
    setup_s: float  # wall time of the whole setup of ``sizes``: compiles, warm-ups, captures or recordings
    compiles: int  # graphs torch.compile (Dynamo) handed a backend during the setup: recompiles included
    pool_bytes: int | None = None

    @property
    def extrapolated_s(self) -> float | None:
        """Mean setup per measured size times the bucket count; None when every bucket was measured."""
        if len(self.sizes) >= self.num_buckets:
            return None
        return self.setup_s / len(self.sizes) * self.num_buckets

    @property
    def all_buckets_s(self) -> float:
        """Setup for every bucket: measured, or extrapolated from the subset."""
        extrapolated = self.extrapolated_s
        return self.setup_s if extrapolated is None else extrapolated


@dataclass
class PrefillSetup:
    """One ``PrefillRunner`` capturing every default prefill bucket up to ``max_tokens``."""

    mode: str
    max_tokens: int
    max_requests: int
    num_buckets: int
    setup_s: float  # runner built and captured (piecewise: its one torch.compile included)
    compiles: int
    pool_bytes: int
    pool: PoolShare | None = None  # the same buckets' pool against the largest alone, and the estimate


@dataclass
class RestartSetup:
    """One compiled decode setup of every bucket in a fresh process: cold (empty compile cache directory), then
    a warm restart over the same directory (``graphhal.bench.setup.restart``)."""

    setup: str
    num_buckets: int
    cold_setup_s: float
    warm_setup_s: float
    cold_process_s: float  # the whole process: interpreter, imports, model, setup
    warm_process_s: float
    cold_compiles: int
    warm_compiles: int
    # full+inductor only: its stored forward loaded and called once in a fresh process, no runner (the floor)
    stored_forward_alone_s: float | None = None


@dataclass
class SetupCost:
    """What a server pays at startup for compiled decode graphs of every bucket, and for prefill graphs."""

    max_bs: int | None = None  # the compiled decode setups cover the default buckets up to this size
    decode: list[CompiledSetup] = field(default_factory=list)
    prefill: list[PrefillSetup] = field(default_factory=list)
    restarts: list[RestartSetup] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def full_inductor_ratio(self, setup: CompiledSetup) -> float | None:
        """full+inductor's setup over ``setup``'s, both for every bucket (``setup``'s maybe extrapolated): the
        compiled setup every other is compared with."""
        reference = next((s for s in self.decode if s.contender == FULL_INDUCTOR), None)
        if reference is None or setup is reference or not setup.all_buckets_s:
            return None
        return reference.all_buckets_s / setup.all_buckets_s


@dataclass
class Header:
    device: str
    device_name: str
    torch_version: str
    dtype: str
    model: dict[str, Any]
    context_len: int
    clock: str
    timer: dict[str, Any]
    description: str = ""
    modes: dict[str, str] = field(default_factory=dict)  # decode contender -> what exactly it runs


@dataclass
class BenchResult:
    header: Header
    rows: list[Row] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    failed: list[Failed] = field(default_factory=list)
    capture_cost: CaptureCost | None = None
    setup_cost: SetupCost | None = None
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0  # the whole run: model, setups, timings, capture cost

    def phase_rows(self, phase: str) -> list[Row]:
        return [row for row in self.rows if row.phase == phase]
