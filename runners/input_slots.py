"""Named input slots: what a runner needs to know about each input of a forward step.

A slot describes one per-row input of the step (token ids, positions, a block-table row...). The runner keeps
one static buffer per slot, sized for the largest bucket, and refills the padded tail of every slot with the
slot's ``fill`` on every run, so padded rows always read a value the model can safely compute on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class InputSlot:
    """One named input of a forward step.

    name:       keyword the forward receives the tensor under.
    dtype:      the dtype every live batch must already have (no silent casts: a cast would be a copy the
                server did not ask for, and a wrong dtype is usually a bug upstream).
    row_shape:  shape of one row; the tensor passed for a batch of ``n`` rows is ``(n, *row_shape)``.
    fill:       value written into padded rows. Pick one the model computes on harmlessly (position 0, a
                sequence length the attention kernel treats as empty, a cache slot no request owns).
    """

    name: str
    dtype: torch.dtype
    row_shape: tuple[int, ...] = ()
    fill: int | float | bool = 0

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"input slot name {self.name!r} must be a Python identifier (it is passed as a keyword)")
        if not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"input slot {self.name!r}: dtype must be a torch.dtype, got {self.dtype!r}")
        object.__setattr__(self, "row_shape", tuple(int(d) for d in self.row_shape))
        if any(d <= 0 for d in self.row_shape):
            raise ValueError(f"input slot {self.name!r}: row_shape {self.row_shape} must have positive sizes")
