"""Rotary position embedding (RoPE), applied by gathering precomputed angles at each row's position."""

from __future__ import annotations

import torch


class RotaryEmbedding(torch.nn.Module):
    """Rotates query/key head vectors by angles that depend on the token's position.

    cos/sin tables for every position up to ``max_seq_len`` are built once; a step gathers its rows with the
    ``positions`` device tensor, so no position value ever reaches the host. Half-split ("NeoX") layout:
    dim ``i`` pairs with dim ``i + head_dim / 2``.

    A step gathers its angles once (``angles``) and every layer rotates its queries and keys together
    (``rotate``): the same float32 math as rotating each separately, in a third of the ops.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float, device: torch.device) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        # float32 tables: bf16 angles at large positions lose whole radians.
        self.register_buffer("cos", angles.cos().float().to(device), persistent=False)
        self.register_buffer("sin", angles.sin().float().to(device), persistent=False)
        # The same tables over the whole head_dim, laid out for ``rotate``: cos for both halves, and sin
        # negated for the first half (first' = first*cos - second*sin = first*cos + second*(-sin), exactly:
        # IEEE a - b is a + (-b), and s * (-t) is -(s * t), signed zeros included).
        self.register_buffer("cos_full", torch.cat((self.cos, self.cos), dim=-1), persistent=False)
        self.register_buffer("sin_signed", torch.cat((-self.sin, self.sin), dim=-1), persistent=False)

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's angles for ``rotate``: (cos, sin) [batch, 1, head_dim] float32, gathered at positions [batch]."""
        return self.cos_full.index_select(0, positions)[:, None, :], self.sin_signed.index_select(0, positions)[:, None, :]

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [batch, heads, head_dim] with ``angles`` of its rows -> x rotated, same dtype, contiguous.

        x * cos + swap_halves(x) * sin: per element the very products and sum that rotating the halves
        separately computes, so the result is bit-identical to that, in float32 then rounded to x's dtype.
        """
        x32 = x.float()
        half = x32.shape[-1] // 2
        rotated = x32 * cos + x32.roll(half, dims=-1) * sin  # roll by half = cat((second, first)), exactly
        return rotated.to(x.dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [batch, heads, head_dim], positions: [batch] int -> x rotated, same dtype."""
        return self.rotate(x, *self.angles(positions))
