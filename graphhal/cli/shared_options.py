"""What more than one command reads from its options the same way: the device and the dtype, by name."""

from __future__ import annotations

import torch

import hal

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def chosen_device(name: str | None) -> hal.Device:
    """The device named by ``--device``, or the best one present where none is named."""
    return hal.get_device(name) if name else hal.best_available_device()
