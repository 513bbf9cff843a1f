"""Host copies of a step's device tensors, read once per step: for kernels that take lengths as host values.

    with hal.step_host_values():                # a runner around one step, a model around one forward
        lengths = hal.host_list(seq_lens)       # every layer: read on the host the first time only

Kernels that take per-request lengths as host values (Ascend's fused attention) need them on the host at every
layer. Read from a device tensor, that is a device synchronisation per layer: vllm-ascend instead builds the
host lists once per step, in its attention metadata (attention_v1.py, ``seq_lens_list``, main 182b75ea). Within
a step the lengths do not change between layers (they are inputs of the step), so ``host_list`` keeps the
first read of each tensor for the rest of the step and holds the tensor, so that its memory cannot be handed
to another tensor during the step. Outside a step (or while torch.compile traces) it reads every time.
Scopes nest: an inner one (the model's forward inside a runner's step) shares the outer one.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator

import torch

_state = threading.local()


def _key(tensor: torch.Tensor) -> tuple[Any, ...]:
    return (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()), tensor.device)


@contextmanager
def step_host_values() -> Iterator[None]:
    """One step: every ``host_list`` of a tensor inside reads it on the host once."""
    if getattr(_state, "known", None) is not None:  # an outer step is open: it is the same step
        yield
        return
    _state.known = {}
    try:
        yield
    finally:
        _state.known = None


def host_list(tensor: torch.Tensor) -> list[Any]:
    """``tensor.tolist()``, read once per step inside ``step_host_values`` (module docstring)."""
    known = getattr(_state, "known", None)
    if known is None or torch.compiler.is_compiling():
        return tensor.tolist()
    key = _key(tensor)
    entry = known.get(key)
    if entry is None:
        entry = known[key] = (tensor, tensor.tolist())  # the tensor held: its address stays its own all step
    return entry[1]
