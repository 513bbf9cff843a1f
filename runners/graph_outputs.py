"""A captured forward's outputs, and how to hand the live rows of them back."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree


class GraphOutputs:
    """The output structure of one captured bucket: a tensor or nested dicts/tuples/lists of tensors.

    Every tensor leaf must have the bucket as its first dimension, so that slicing the live rows back out
    is well defined. ``None`` leaves pass through.
    """

    def __init__(self, outputs: Any, bucket: int) -> None:
        leaves, self._spec = pytree.tree_flatten(outputs)
        for path, leaf in _leaf_paths(outputs):
            if leaf is None:
                continue
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(
                    f"forward output {path} is a {type(leaf).__name__}; captured outputs must be tensors "
                    "(or None): a host value computed at capture would be replayed unchanged"
                )
            if leaf.dim() == 0 or leaf.shape[0] != bucket:
                raise TypeError(
                    f"forward output {path} has shape {tuple(leaf.shape)}; every output tensor needs the batch "
                    f"({bucket} rows at this bucket) as its first dimension"
                )
        self._leaves = leaves
        self._single = isinstance(outputs, torch.Tensor)

    def same_tensors(self, other: "GraphOutputs") -> bool:
        """Whether both hold the very same tensors, leaf for leaf (same structure, same memory)."""
        return self._spec == other._spec and all(a is b for a, b in zip(self._leaves, other._leaves))

    def live_rows(self, rows: int) -> Any:
        """Views of the first ``rows`` rows of every output (views into graph memory, not copies)."""
        if self._single:
            return self._leaves[0][:rows]
        return pytree.tree_unflatten([None if t is None else t[:rows] for t in self._leaves], self._spec)


def _leaf_paths(outputs: Any, path: str = "output") -> list[tuple[str, Any]]:
    if isinstance(outputs, dict):
        return [item for key, value in outputs.items() for item in _leaf_paths(value, f"{path}[{key!r}]")]
    if isinstance(outputs, (tuple, list)):
        return [item for i, value in enumerate(outputs) for item in _leaf_paths(value, f"{path}[{i}]")]
    return [(path, outputs)]
