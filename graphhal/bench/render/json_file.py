"""The bench result as JSON, for machines: every dataclass field, plus the derived figures the table shows.

``schema_version`` goes up when a key changes meaning or goes away; new keys may come at any time.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from graphhal.bench.results import BenchResult

SCHEMA_VERSION = 1


def to_json(result: BenchResult) -> dict[str, Any]:
    data: dict[str, Any] = {"schema_version": SCHEMA_VERSION, **dataclasses.asdict(result)}
    if result.capture_cost is not None:  # derived values, so readers need not recompute them
        data["capture_cost"]["pool_ratio"] = result.capture_cost.pool_ratio
        data["capture_cost"]["break_cost_us"] = result.capture_cost.break_cost_us
    if result.setup_cost is not None:
        for setup, entry in zip(result.setup_cost.decode, data["setup_cost"]["decode"]):
            entry["extrapolated_s"] = setup.extrapolated_s
            entry["full_inductor_ratio"] = result.setup_cost.full_inductor_ratio(setup)
    return _finite(data)


def write_json(result: BenchResult, path: Path) -> None:
    path.write_text(json.dumps(to_json(result), indent=2, allow_nan=False) + "\n")


def _finite(value: Any) -> Any:
    """NaN and infinities as null: JSON has no spelling for them (an unstable timing's error is inf, a
    broken output's difference NaN), and strict parsers reject Python's."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
