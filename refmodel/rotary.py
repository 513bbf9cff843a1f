"""Rotary position embedding (RoPE), applied by gathering precomputed angles at each row's position."""

from __future__ import annotations

import torch


class RotaryEmbedding(torch.nn.Module):
    """Rotates query/key head vectors by angles that depend on the token's position.

    cos/sin tables for every position up to ``max_seq_len`` are built once; a step gathers its rows with the
    ``positions`` device tensor, so no position value ever reaches the host. Half-split ("NeoX") layout:
    dim ``i`` pairs with dim ``i + head_dim / 2``.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float, device: torch.device) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        # float32 tables: bf16 angles at large positions lose whole radians.
        self.register_buffer("cos", angles.cos().float().to(device), persistent=False)
        self.register_buffer("sin", angles.sin().float().to(device), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [batch, heads, head_dim], positions: [batch] int -> x rotated, same dtype."""
        cos = self.cos.index_select(0, positions)[:, None, :]
        sin = self.sin.index_select(0, positions)[:, None, :]
        first, second = x.float().chunk(2, dim=-1)
        rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
        return rotated.to(x.dtype)
