"""Does a contender compute what eager computes? A fast wrong step is no win, so every row says."""

from __future__ import annotations

import math

import torch
from torch.utils._pytree import tree_leaves


def max_abs_difference(got: object, expected: object) -> float:
    """Largest |got - expected| over the tensors of two outputs of the same structure (NaN if either has NaN)."""
    got_leaves = _tensor_leaves(got)
    expected_leaves = _tensor_leaves(expected)
    if len(got_leaves) != len(expected_leaves):
        raise ValueError(f"outputs differ in structure: {len(got_leaves)} tensors vs {len(expected_leaves)} from eager")
    worst = 0.0
    for a, b in zip(got_leaves, expected_leaves):
        if a.shape != b.shape:
            raise ValueError(f"outputs differ in shape: {tuple(a.shape)} vs {tuple(b.shape)} from eager")
        if a.numel():
            difference = (a.float() - b.float()).abs().max().item()
            if math.isnan(difference):  # max() would drop it: NaN compares false with everything
                return math.nan
            worst = max(worst, difference)
    return worst


def detached_copy(outputs: object) -> list[torch.Tensor]:
    """The tensors of an output, copied: graph outputs live in memory the next step overwrites."""
    return [leaf.detach().clone() for leaf in _tensor_leaves(outputs)]


def _tensor_leaves(outputs: object) -> list[torch.Tensor]:
    return [leaf for leaf in tree_leaves(outputs) if isinstance(leaf, torch.Tensor)]
