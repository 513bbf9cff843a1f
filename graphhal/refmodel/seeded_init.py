"""The reference model's weights: drawn from one seed on the CPU, the same on every device."""

from __future__ import annotations

from typing import Callable

import torch


class SeededInit:
    """Draws every weight from one CPU generator in float32, then moves it to the device and dtype.

    Drawing on the CPU makes the weights for a seed the same on every device, so a CUDA run and a CPU run
    of one seed compute the same model.
    """

    def __init__(self, seed: int, device: torch.device, dtype: torch.dtype) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.device = device
        self.dtype = dtype

    def normal(self, *shape: int, std: float, shard: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.nn.Parameter:
        """A weight of the full ``shape``, drawn whatever ``shard`` keeps of it (a tensor-parallel rank's
        slice), so every rank's draws, and a single process's, follow one sequence."""
        weight = torch.randn(shape, generator=self.generator) * std
        if shard is not None:
            weight = shard(weight)
        return torch.nn.Parameter(weight.to(self.device, self.dtype), requires_grad=False)
