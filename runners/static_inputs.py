"""The runner's static input buffers: the only tensors a captured graph reads its inputs from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from runners.input_slots import InputSlot


_MAX_KEPT_COPIES = 1024  # (rows, bucket) pairs whose copy views are kept


@dataclass
class _Copies:
    """What ``StaticInputs.load`` writes for one (rows, bucket): live rows per dtype, padded rows per fill."""

    live: list[tuple[tuple[str, ...], list[torch.Tensor]]]
    padding: list[tuple[float, list[torch.Tensor]]]


class StaticInputs:
    """One buffer per slot, ``(capacity, *row_shape)``, allocated once on the device (none without slots).

    A graph captured at bucket ``b`` reads rows ``[:b]`` of every buffer; ``load`` writes a live batch into
    them and refills the padded rows, and ``views`` gives the tensors a forward is captured with.
    """

    def __init__(self, slots: Sequence[InputSlot], capacity: int, device: torch.device) -> None:
        names = [slot.name for slot in slots]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"input slots must have unique names; repeated: {', '.join(duplicates)}")
        self.slots = tuple(slots)
        self.capacity = capacity
        self.device = device
        # Normal tensors even when the runner is built under torch.inference_mode: an inference tensor could
        # not be written outside inference mode, and the runner writes these on every run, in any mode.
        with torch.inference_mode(False):
            self.buffers: dict[str, torch.Tensor] = {
                slot.name: torch.full((capacity, *slot.row_shape), slot.fill, dtype=slot.dtype, device=device)
                for slot in slots
            }
        # A step's copies, grouped: torch._foreach_copy_ copies one dtype's live rows in one kernel on CUDA
        # (device-resident sources; its fast path wants a single dtype), and _foreach_zero_ and _foreach_add_
        # refill one (dtype, fill)'s padded rows in one kernel each, where a copy_ and a fill_ per slot cost a
        # launch and a trip through Python each (58 us of a 2.2 ms step for five slots on an H200 host).
        by_dtype: dict[torch.dtype, list[str]] = {}
        by_fill: dict[tuple[torch.dtype, float], list[str]] = {}
        for slot in slots:
            by_dtype.setdefault(slot.dtype, []).append(slot.name)
            by_fill.setdefault((slot.dtype, slot.fill), []).append(slot.name)
        self._live_groups = [tuple(names) for names in by_dtype.values()]
        self._padding_groups = [(fill, tuple(names)) for (_, fill), names in by_fill.items()]
        self._copies: dict[tuple[int, int], _Copies] = {}
        # What count_rows checks per slot, read once: name, dtype, dimensions and row shape.
        self._expected = [(slot.name, slot.dtype, 1 + len(slot.row_shape), torch.Size(slot.row_shape)) for slot in slots]

    def count_rows(self, batch: Mapping[str, torch.Tensor], allow_empty: bool = False) -> int:
        """Validate this buffer set's slots of a live batch (their names already checked); return the row
        count, 0 without slots. ValueError names the bad slot. ``allow_empty``: a batch of no rows is valid (an
        idle rank's step)."""
        rows = self._rows_if_valid(batch)
        if rows is None or (rows < 1 and not allow_empty):
            return self._count_rows_naming_the_problem(batch, allow_empty)
        return rows

    def _rows_if_valid(self, batch: Mapping[str, torch.Tensor]) -> int | None:
        """The row count when every slot passes ``_count_rows_naming_the_problem``'s checks (None where one
        fails, or without slots): the same checks in one expression a slot, on the run path of every step."""
        rows = None
        for name, dtype, dim, row_shape in self._expected:
            tensor = batch[name]
            if not (
                isinstance(tensor, torch.Tensor) and tensor.dtype == dtype and not tensor.requires_grad
                and tensor.dim() == dim and tensor.shape[1:] == row_shape and (tensor.is_cpu or tensor.device == self.device)
                and (rows is None or tensor.shape[0] == rows)
            ):
                return None
            rows = tensor.shape[0]
        return rows

    def _count_rows_naming_the_problem(self, batch: Mapping[str, torch.Tensor], allow_empty: bool) -> int:
        rows = None
        for slot in self.slots:
            tensor = batch[slot.name]
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"input slot {slot.name!r}: expected a tensor, got {type(tensor).__name__}")
            if tensor.dtype != slot.dtype:
                raise ValueError(f"input slot {slot.name!r}: dtype {tensor.dtype}, expected {slot.dtype}")
            if tensor.device != self.device and tensor.device.type != "cpu":
                raise ValueError(
                    f"input slot {slot.name!r}: tensor is on {tensor.device}, expected {self.device} (or the host)"
                )
            if tensor.requires_grad:
                raise ValueError(
                    f"input slot {slot.name!r}: the tensor requires grad; runners run inference only and never "
                    "record autograd history: pass tensor.detach()"
                )
            if tensor.dim() != 1 + len(slot.row_shape) or tuple(tensor.shape[1:]) != slot.row_shape:
                raise ValueError(
                    (
                        f"input slot {slot.name!r}: shape {tuple(tensor.shape)}, expected (rows, {', '.join(map(str, slot.row_shape))})"
                        if slot.row_shape
                        else f"input slot {slot.name!r}: shape {tuple(tensor.shape)}, expected (rows,)"
                    )
                    + _per_token_hint(slot)
                )
            if rows is None:
                rows = tensor.shape[0]
            elif tensor.shape[0] != rows:
                raise ValueError(
                    f"input slot {slot.name!r} has {tensor.shape[0]} rows but {self.slots[0].name!r} has {rows}; "
                    "every slot needs one row per request"
                )
        if rows is None:
            return 0
        if rows < 1 and not allow_empty:
            raise ValueError(
                "batch has no rows; a step needs at least one request (a rank with no work passes an empty "
                "batch only to a runner with a consensus_group, which runs it as a padded idle step)"
            )
        return rows

    def load(self, batch: Mapping[str, torch.Tensor], rows: int, bucket: int) -> None:
        """Copy the live rows in and refill rows ``[rows:bucket]`` with each slot's fill, on every call:
        a padded row left over from a previous, larger batch would point attention at a live request's
        cache or at freed blocks. A host tensor is copied without blocking the host (from pinned memory)."""
        copies = self._copies.get((rows, bucket))
        if copies is None:
            copies = self._copies_for(rows, bucket)
        if rows:
            for names, destinations in copies.live:
                torch._foreach_copy_(destinations, [batch[name] for name in names], non_blocking=True)
        for fill, padded in copies.padding:
            torch._foreach_zero_(padded)
            if fill:
                torch._foreach_add_(padded, fill)

    def _copies_for(self, rows: int, bucket: int) -> _Copies:
        """The views a step with ``rows`` live rows at ``bucket`` writes, per group; kept per (rows, bucket),
        since making the views costs more than the copies themselves on the hot path."""
        if len(self._copies) >= _MAX_KEPT_COPIES:  # prefill sees thousands of token counts: keep the memory bounded
            self._copies.clear()
        live = [(names, [self.buffers[name][:rows] for name in names]) for names in self._live_groups]
        padding = []
        if bucket > rows:
            padding = [(fill, [self.buffers[name][rows:bucket] for name in names]) for fill, names in self._padding_groups]
        copies = self._copies[(rows, bucket)] = _Copies(live, padding)
        return copies

    def fill_padding(self, bucket: int) -> None:
        """Every row of the bucket set to the slot fill: the inputs warm-up and capture run with."""
        for slot in self.slots:
            self.buffers[slot.name][:bucket].fill_(slot.fill)

    def views(self, bucket: int) -> dict[str, torch.Tensor]:
        return {name: buffer[:bucket] for name, buffer in self.buffers.items()}


def _per_token_hint(slot: InputSlot) -> str:
    if not slot.per_token:
        return ""
    tokens = slot.row_shape[0] if slot.row_shape else 1
    return (
        f" (a per-token slot: one row per request holding its {tokens} new token{'s' if tokens > 1 else ''}; the "
        "runner's query_tokens)"
    )
