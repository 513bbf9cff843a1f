"""How many NPU graphs a device can still hold: every captured ACL graph keeps one of the device's streams.

An Ascend device has about 2,048 streams, shared by every graph of the process, the runtime's own and HCCL's.
vllm-ascend keeps its graphs under about 1,800 for this (its capture sizes capped from ``num_hidden_layers + 1``
graphs per size, vllm_ascend/utils.py) and names the failure "resource alloc fail" (error 207008), which is
what a capture past the limit reports. The plugin counts the NPU graphs alive per device and answers
``hal_graph_budget`` with what is left of ``graph_limit()``: 1,800 unless ``GRAPHHAL_NPU_MAX_GRAPHS`` says how
many this process may make (a deployment that knows its other streams).
"""

from __future__ import annotations

import os
import weakref
from typing import Any

DEFAULT_GRAPH_LIMIT = 1800
LIMIT_VARIABLE = "GRAPHHAL_NPU_MAX_GRAPHS"

_alive: dict[int, "weakref.WeakSet[Any]"] = {}


def graph_limit() -> int:
    value = os.environ.get(LIMIT_VARIABLE)
    if value is None:
        return DEFAULT_GRAPH_LIMIT
    try:
        limit = int(value)
    except ValueError:
        raise ValueError(f"{LIMIT_VARIABLE}={value!r}: expected a whole number of graphs") from None
    if limit < 1:
        raise ValueError(f"{LIMIT_VARIABLE}={value!r}: expected at least 1 graph")
    return limit


def track(graph: Any, index: int) -> None:
    """Count ``graph`` against device ``index`` for as long as it lives."""
    _alive.setdefault(index, weakref.WeakSet()).add(graph)


def graphs_left(index: int) -> int:
    return max(0, graph_limit() - len(_alive.get(index, ())))
