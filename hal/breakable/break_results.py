"""Writing an eager step's fresh result into the tensors captured segments read (the "copy-back")."""

from __future__ import annotations

from typing import Any

import torch

from hal.errors import GraphHalError


class BreakResultMismatchError(GraphHalError, RuntimeError):
    """An eager step returned, at replay, something shaped differently from what it returned at capture."""


def copy_back(captured: Any, fresh: Any, where: str) -> None:
    """Write ``fresh`` into ``captured``: tensors in place, dicts per key, sequences per item, other objects
    by their attributes. Anything else (None, ints, strings) was returned as is at capture and may have been
    baked into the segments after the break, so it must come back unchanged."""
    if isinstance(captured, torch.Tensor):
        if not isinstance(fresh, torch.Tensor):
            raise BreakResultMismatchError(f"{where}: returned a tensor at capture but {type(fresh).__name__} at replay")
        if fresh is captured:  # the function wrote into its own argument and returned it
            return
        if fresh.shape != captured.shape or fresh.dtype != captured.dtype:
            raise BreakResultMismatchError(
                f"{where}: returned {tuple(fresh.shape)} {fresh.dtype} at replay but {tuple(captured.shape)} "
                f"{captured.dtype} at capture; a break must return the same shape and dtype for a captured shape"
            )
        captured.copy_(fresh)
    elif isinstance(captured, dict):
        if not isinstance(fresh, dict) or fresh.keys() != captured.keys():
            raise BreakResultMismatchError(f"{where}: returned a dict with other keys at replay than at capture")
        for key, value in captured.items():
            copy_back(value, fresh[key], f"{where}[{key!r}]")
    elif isinstance(captured, (tuple, list)):
        if not isinstance(fresh, (tuple, list)) or len(fresh) != len(captured):
            raise BreakResultMismatchError(f"{where}: returned a sequence of another length at replay than at capture")
        for index, (old, new) in enumerate(zip(captured, fresh)):
            copy_back(old, new, f"{where}[{index}]")
    elif hasattr(captured, "__dict__") and not callable(captured):
        for attribute, value in vars(captured).items():
            copy_back(value, getattr(fresh, attribute, None), f"{where}.{attribute}")
    elif fresh != captured:
        # The segments after the break were captured with the old value baked in (a length, a flag).
        raise BreakResultMismatchError(
            f"{where}: returned {fresh!r} at replay but {captured!r} at capture; the captured segments after the "
            "break used the capture-time value. Return host values that change per batch as device tensors."
        )
