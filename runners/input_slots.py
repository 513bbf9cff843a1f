"""Named input slots: what a runner needs to know about each input of a forward step.

A slot describes one per-row input of the step (token ids, positions, a block-table row...). The runner keeps
one static buffer per slot, sized for the largest bucket, and refills the padded tail of every slot with the
slot's ``fill`` on every run, so padded rows always read a value the model can safely compute on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from hal import DeviceConventions, SlotRole


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
    per_token:  the slot holds one value per new token of a request (token ids, positions, cache slots), not
                one per request (lengths, block tables). A decode runner with ``query_tokens=q > 1`` checks
                that such slots have ``q`` first in their row shape (``(q,)`` for a token id per token); with
                ``q = 1`` their rows are ``()`` (or ``(1, ...)``). Prefill rows are tokens already: unused there.
    """

    name: str
    dtype: torch.dtype
    row_shape: tuple[int, ...] = ()
    fill: int | float | bool = 0
    role: str | None = None
    per_token: bool = False

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
        _check_fill(self.name, self.dtype, self.fill)
        if self.role == SlotRole.QUERY_LENS and (self.fill != 0 or self.dtype.is_floating_point or self.row_shape):
            raise ValueError(
                f"input slot {self.name!r}: a {SlotRole.QUERY_LENS} slot holds one integer token count per request "
                f"and pads with 0 (a padded request has no tokens); got dtype {self.dtype}, row_shape "
                f"{self.row_shape}, fill {self.fill!r}"
            )

    def for_device(self, conventions: DeviceConventions) -> "InputSlot":
        """This slot with the dtype and fill the device's conventions give its role (unchanged without one)."""
        if self.role == SlotRole.CACHE_LOCATIONS:
            return replace(self, dtype=conventions.cache_location_dtype)
        if self.role == SlotRole.SEQ_LENS:
            # A slot asking for a longer padding length keeps it (rows of q > 1 query tokens pad with q: causal
            # attention from the cached context on takes no KV length below the query's tokens).
            return replace(self, dtype=conventions.seq_len_dtype, fill=max(self.fill, conventions.seq_len_fill))
        return self


def _check_fill(name: str, dtype: torch.dtype, fill: object) -> None:
    """ValueError naming the slot unless ``fill`` is a value of ``dtype``: a fill that overflows would be
    written into padded rows as some other number, silently."""
    if dtype == torch.bool:
        if not isinstance(fill, bool):
            raise ValueError(f"input slot {name!r}: fill for a bool slot must be True or False, got {fill!r}")
        return
    if isinstance(fill, bool) or not isinstance(fill, (int, float)):
        raise ValueError(f"input slot {name!r}: fill must be a number for dtype {dtype}, got {fill!r}")
    if dtype.is_floating_point:
        limit = torch.finfo(dtype).max
        if isinstance(fill, float) and fill != fill or abs(fill) == float("inf"):  # nan and inf are values too
            return
        if abs(fill) > limit:
            raise ValueError(f"input slot {name!r}: fill {fill!r} overflows {dtype} (largest magnitude {limit:g})")
        return
    if dtype.is_complex:
        return
    if not isinstance(fill, int):
        raise ValueError(f"input slot {name!r}: fill for integer dtype {dtype} must be an int, got {fill!r}")
    info = torch.iinfo(dtype)
    if not info.min <= fill <= info.max:
        raise ValueError(f"input slot {name!r}: fill {fill} does not fit {dtype} (allowed {info.min}..{info.max})")
