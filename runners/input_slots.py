"""Named input slots: what a runner needs to know about each input of a forward step.

A slot describes one per-row input of the step (token ids, positions, a block-table row...). The runner keeps
one static buffer per slot, sized for the largest bucket, and refills the padded tail of every slot with the
slot's ``fill`` on every run, so padded rows always read a value the model can safely compute on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from hal.conventions import DeviceConventions, SlotRole


@dataclass(frozen=True)
class InputSlot:
    """One named input of a forward step.

    name:       keyword the forward receives the tensor under.
    dtype:      the dtype every live batch must already have (no silent casts: a cast would be a copy the
                server did not ask for, and a wrong dtype is usually a bug upstream).
    row_shape:  shape of one row; the tensor passed for a batch of ``n`` rows is ``(n, *row_shape)``.
    fill:       value written into padded rows. Pick one the model computes on harmlessly (position 0, a
                sequence length the attention kernel treats as empty, a cache slot no request owns).
    role:       ``hal.SlotRole.CACHE_LOCATIONS`` or ``hal.SlotRole.SEQ_LENS`` hands the slot's dtype (and, for
                lengths, its fill) to the device's conventions: ``for_device`` resolves them. On a device whose
                graphs bake host values, the runner also passes the live lengths to ``Device.update``.
    """

    name: str
    dtype: torch.dtype
    row_shape: tuple[int, ...] = ()
    fill: int | float | bool = 0
    role: str | None = None

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"input slot name {self.name!r} must be a Python identifier (it is passed as a keyword)")
        if not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"input slot {self.name!r}: dtype must be a torch.dtype, got {self.dtype!r}")
        object.__setattr__(self, "row_shape", tuple(int(d) for d in self.row_shape))
        if any(d <= 0 for d in self.row_shape):
            raise ValueError(f"input slot {self.name!r}: row_shape {self.row_shape} must have positive sizes")
        if self.role is not None and self.role not in SlotRole.ALL:
            raise ValueError(f"input slot {self.name!r}: unknown role {self.role!r}; roles: {', '.join(SlotRole.ALL)}")

    def for_device(self, conventions: DeviceConventions) -> "InputSlot":
        """This slot with the dtype and fill the device's conventions give its role (unchanged without one)."""
        if self.role == SlotRole.CACHE_LOCATIONS:
            return replace(self, dtype=conventions.cache_location_dtype)
        if self.role == SlotRole.SEQ_LENS:
            return replace(self, dtype=conventions.seq_len_dtype, fill=conventions.seq_len_fill)
        return self
