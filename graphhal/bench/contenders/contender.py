"""What a contender is: a name, why a device cannot run it, and how it is set up for one size's inputs.

``prepare`` turns (the workload, one size's inputs: a decode batch or a prefill case) into a ``Prepared``
step: a zero-argument callable running one step on those inputs, plus what it cost to set up. Every
contender is set up from scratch per size, so its setup time and pool memory belong to that size alone.

Contenders of one size are alive together (they are timed interleaved), so none of them resets torch.compile
state or frees memory: another may still call its compiled code or replay its graph. The run does it between
sizes (``graphhal.bench.measurements``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Generic, Mapping, TypeVar

import torch

import hal
from graphhal.bench.workload import Workload

Batch = Mapping[str, torch.Tensor]  # a decode step's inputs, one row per request
Inputs = TypeVar("Inputs")  # what one size hands a contender: a Batch for decode, a PrefillCase for prefill


@dataclass
class Prepared:
    """One contender set up for one size: ``run()`` does a step and returns its outputs."""

    run: Callable[[], Any]
    setup_s: float | None = None  # compile + warm-up + capture; None for eager
    pool_bytes: int | None = None  # graph memory pool after setup; None when there is none or it is unknown
    compares: bool = True  # False: its outputs are of other inputs than eager's (a baseline timed only)


class Contender(ABC, Generic[Inputs]):
    name: str
    detail: str = ""  # what exactly runs, for the table's notes and the JSON

    def skip_reason(self, device: hal.Device) -> str | None:
        """Why this contender cannot run on ``device`` (or with this graphhal), or None when it can."""
        return None

    @abstractmethod
    def prepare(self, workload: Workload, inputs: Inputs) -> Prepared: ...


def missing_mode(device: hal.Device, mode: str) -> str | None:
    """Why ``device`` cannot run graph mode ``mode``, or None when it offers it."""
    if mode not in device.modes:
        return f"device {device} does not offer mode {mode!r} (its modes: {', '.join(device.modes)})"
    return None
