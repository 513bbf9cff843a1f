"""Benchmark: the reference decode step eager vs full graph vs breakable graph, and the cost of one break.

    python -m benchmarks.breakable_decode [--device cuda:0] [--batch-sizes 1,64] [any graphhal bench option]

A thin wrapper over ``graphhal bench`` (graphhal_cli/bench), which measures all of this in one run on one
device: the decode modes ``full`` and ``breakable`` (plus the hand-written floor) against eager, and in its
capture section one break's cost, (breakable - full) at batch 1 divided by the breaks in one step.
"""

from __future__ import annotations

import sys

from graphhal_cli.main import main as graphhal

BREAKABLE_ONLY = ["--modes", "floor,full,breakable", "--no-prefill"]


def main(argv: list[str] | None = None) -> int:
    return graphhal(["bench", *BREAKABLE_ONLY, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
