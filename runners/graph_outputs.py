"""A captured forward's outputs, and how to hand the live rows of them back."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree


class GraphOutputs:
    """The output structure of one captured bucket: a tensor or nested dicts/tuples/lists of tensors.

    Every tensor leaf must have the bucket as its first dimension, so that slicing the live rows back out
    is well defined; except, in a dict, the entries named in ``request_outputs``, which have one row per
    request (``requests`` rows: a prefill step's sampled tokens, one per request). ``None`` leaves pass through.
    """

    def __init__(self, outputs: Any, bucket: int, request_outputs: frozenset[str] = frozenset(), requests: int = 0) -> None:
        leaves, self._spec = pytree.tree_flatten(outputs)
        # Which leaves are per request, in pytree's own order: a dict's entries flatten one after the other.
        self._per_request = (
            [key in request_outputs for key, value in outputs.items() for _ in pytree.tree_flatten(value)[0]]
            if isinstance(outputs, dict)
            else [False] * len(leaves)
        )
        for path, leaf, key in _leaf_paths(outputs):
            is_request_row = isinstance(outputs, dict) and key in request_outputs
            if leaf is None:
                continue
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(
                    f"forward output {path} is a {type(leaf).__name__}; captured outputs must be tensors "
                    "(or None): a host value computed at capture would be replayed unchanged"
                )
            rows, what = (requests, "requests") if is_request_row else (bucket, "the batch")
            if leaf.dim() == 0 or leaf.shape[0] != rows:
                raise TypeError(
                    f"forward output {path} has shape {tuple(leaf.shape)}; every output tensor needs {what} "
                    f"({rows} rows here) as its first dimension"
                )
        self._leaves = leaves
        self._single = isinstance(outputs, torch.Tensor)
        # A plain dict of tensors (what nearly every step returns): its live rows are rebuilt as a dict directly,
        # where pytree's unflatten costs a few microseconds a step on the run path.
        flat = type(outputs) is dict and all(isinstance(value, torch.Tensor) for value in outputs.values())
        self._flat_keys = list(outputs) if flat else None

    def same_tensors(self, other: "GraphOutputs") -> bool:
        """Whether both hold the very same tensors, leaf for leaf (same structure, same memory)."""
        return self._spec == other._spec and all(a is b for a, b in zip(self._leaves, other._leaves))

    def live_rows(self, rows: int, requests: int = 0) -> Any:
        """Views of the live rows of every output, ``rows`` per batch row and ``requests`` per request (views
        into graph memory, not copies)."""
        if self._single:
            return self._leaves[0][:rows]
        if self._flat_keys is not None:
            return {
                key: t[: requests if per_request else rows]
                for key, t, per_request in zip(self._flat_keys, self._leaves, self._per_request)
            }
        live = [
            None if t is None else t[: requests if per_request else rows]
            for t, per_request in zip(self._leaves, self._per_request)
        ]
        return pytree.tree_unflatten(live, self._spec)


def _leaf_paths(outputs: Any, path: str = "output", key: Any = None) -> list[tuple[str, Any, Any]]:
    """(path, leaf, top-level dict key) of every leaf, in pytree's order."""
    if isinstance(outputs, dict):
        return [
            item for name, value in outputs.items()
            for item in _leaf_paths(value, f"{path}[{name!r}]", name if key is None else key)
        ]
    if isinstance(outputs, (tuple, list)):
        return [item for i, value in enumerate(outputs) for item in _leaf_paths(value, f"{path}[{i}]", key)]
    return [(path, outputs, key)]

