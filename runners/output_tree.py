"""Mapping a function over the tensors of a step's outputs, on the per-step path.

A forward returns a tensor or nested dicts, tuples and lists of tensors, and pytree walks any of them. Its
generic walk (flatten to leaves and a spec, map, unflatten) costs about 10 us a call on a 2-core host, and a
submitted step pays it twice (the copy out of the pool, the copy to the host): host time a speculative loop,
which waits for every verify step, adds to each step. Nearly every step returns a flat dict of tensors (a
sampling step's tokens and log-probabilities, a verify step's tokens and counts): that case is mapped here
directly, into the dict pytree would build (same keys, same order); every other structure goes to pytree.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree


def map_tensors(fn: Callable[[torch.Tensor], Any], outputs: Any) -> Any:
    """``pytree.tree_map_only(torch.Tensor, fn, outputs)``, without the generic walk for a tensor or a plain
    dict whose values are tensors (or None)."""
    if isinstance(outputs, torch.Tensor):
        return fn(outputs)
    if type(outputs) is dict and all(value is None or isinstance(value, torch.Tensor) for value in outputs.values()):
        # Checked before mapping: a copy made and then dropped on finding a nested value would be device work
        # (a clone, or a copy to the host) for nothing.
        return {name: None if value is None else fn(value) for name, value in outputs.items()}
    return pytree.tree_map_only(torch.Tensor, fn, outputs)
