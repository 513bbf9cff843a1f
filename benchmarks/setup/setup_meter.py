"""How many graphs torch.compile has compiled: the count each setup measurement reports."""

from __future__ import annotations


def dynamo_compiles() -> int:
    """Graphs Dynamo has handed a backend in this process, whatever the backend (Inductor with or without
    cudagraph trees, graphhal's piecewise backend).

    Read before and after a setup, the difference is its compile count, recompiles after a failed guard
    included: a backend's own counter sees only the backend it belongs to, and reduce-overhead has none.
    """
    from torch._dynamo.utils import counters  # imported late, as torch.compile is only used by some runs

    return counters["stats"]["unique_graphs"]
