"""Every input buffer of a runner's step, row slots and request slots alike, behind one object.

A step has up to two row counts. Row slots have one row per request in decode, per packed token in prefill,
and are padded to the bucket the step replays. Request slots (prefill only: query lengths, sequence lengths,
block tables) have one row per request and are padded to a fixed count every step. ``StepInputs`` owns both
buffer sets (``StaticInputs`` each; a decode runner's request set simply has no slots), so the runner asks one
object to check a batch, load it, pad it and describe it, whatever the phase.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Mapping  # isinstance against typing's alias costs three times as much, per step
from typing import Any, Sequence

import torch

import hal
from runners.input_slots import InputSlot
from runners.static_inputs import StaticInputs


@dataclass(frozen=True)
class BatchRows:
    """A live batch's size: ``rows`` of the row slots (what is bucketed), ``requests`` of the request slots."""

    rows: int
    requests: int = 0


class StepInputs:
    """The static buffers a captured step reads its inputs from.

    row_slots:      padded to the bucket (``max_rows`` rows allocated: the largest bucket).
    request_slots:  padded to ``max_requests`` rows on every step; their fills must mark a request with no tokens.
    conventions:    the device's: role slots (cache locations, lengths) take their dtype and fill from it.
    """

    def __init__(
        self,
        row_slots: Sequence[InputSlot],
        request_slots: Sequence[InputSlot],
        max_rows: int,
        max_requests: int,
        device: "hal.Device",
    ) -> None:
        if not row_slots:
            raise ValueError("a runner needs at least one input slot (every slot's first dimension is the batch)")
        conventions = device.conventions
        self.row_slots = tuple(slot.for_device(conventions) for slot in row_slots)
        self.request_slots = tuple(slot.for_device(conventions) for slot in request_slots)
        self.rows = StaticInputs(self.row_slots, max_rows, device.torch_device)
        self.requests = StaticInputs(self.request_slots, max_requests if request_slots else 0, device.torch_device)
        self.max_requests = self.requests.capacity
        self._names = frozenset(slot.name for slot in (*self.row_slots, *self.request_slots))
        # On devices that bake host values into graphs (NPU attention lengths), these slots' live values go to
        # Device.update before every replay: the lengths attended to, and in a packed batch the new tokens per
        # request.
        self._updated = [
            slot for slot in self.slots if slot.role in (hal.SlotRole.SEQ_LENS, hal.SlotRole.QUERY_LENS)
        ] if device.needs_graph_update else []
        # Per-request token counts of a packed batch: checked on the host against the batch's token rows before
        # every replay, because a padded graph cannot tell (its bucket has room for the extra tokens).
        self._query_len_slots = [slot for slot in self.slots if slot.role == hal.SlotRole.QUERY_LENS]

    @property
    def slots(self) -> tuple[InputSlot, ...]:
        return (*self.row_slots, *self.request_slots)

    @property
    def names(self) -> list[str]:
        return sorted(self._names)

    @property
    def buffers(self) -> dict[str, torch.Tensor]:
        """Every static buffer by slot name: what a captured graph reads at fixed addresses."""
        return {**self.rows.buffers, **self.requests.buffers}

    # --- a live batch ------------------------------------------------------------------------------------

    def check(self, batch: Mapping[str, torch.Tensor], allow_empty: bool = False) -> BatchRows:
        """Validate a live batch against the slots; ValueError or TypeError naming what is wrong. An empty
        batch (no rows) is a rank's idle step, allowed only with ``allow_empty``."""
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"run() takes a mapping of slot name to tensor (e.g. {{'input_ids': tensor, ...}}), got "
                f"{type(batch).__name__}; this runner's slots: {', '.join(self.names)}"
            )
        names = batch.keys()
        if names != self._names:
            missing = sorted(self._names - names)
            unexpected = sorted(map(str, names - self._names))
            raise ValueError(
                "batch does not match the runner's input slots"
                + (f"; missing: {', '.join(missing)}" if missing else "")
                + (f"; unexpected: {', '.join(unexpected)}" if unexpected else "")
                + f"; expected exactly: {', '.join(self.names)}"
            )
        shape = BatchRows(self.rows.count_rows(batch, allow_empty), self.requests.count_rows(batch, allow_empty))
        for slot in self._query_len_slots:
            _check_query_lens(slot, batch[slot.name], shape.rows)
        return shape

    def fits(self, shape: BatchRows, max_rows: int) -> bool:
        """Whether a checked batch fits buffers of ``max_rows`` rows (an idle step's 0 rows fit)."""
        return shape.rows <= max_rows and shape.requests <= self.max_requests

    def describe_misfit(self, shape: BatchRows, max_rows: int, size_field: str) -> str:
        if shape.rows > max_rows:
            return f"batch of {shape.rows} rows exceeds {size_field} {max_rows}"
        return (
            f"batch has {shape.requests} rows of per-request inputs, more than the {self.max_requests} the runner "
            "holds"
        )

    def load(self, batch: Mapping[str, torch.Tensor], shape: BatchRows, bucket: int) -> None:
        """Copy a live batch into the buffers, refilling the padded rows of both sets."""
        self.rows.load(batch, shape.rows, bucket)
        self.requests.load(batch, shape.requests, self.max_requests)

    def graph_update(self, batch: Mapping[str, torch.Tensor], shape: BatchRows, bucket: int) -> dict[str, Any]:
        """The host values a device that bakes them into graphs refreshes before a replay at ``bucket``
        (``Device.update``): slot role -> live values padded to the graph's rows. Empty on other devices.

        A fresh host list per run: the device may apply it asynchronously, so the runner must never hand over a
        buffer it will mutate for the next step while this one may still be read. (A host tensor in the batch
        costs no device sync here; a device tensor costs one.)"""
        params = {}
        for slot in self._updated:
            live, padded = (shape.requests, self.max_requests) if slot in self.request_slots else (shape.rows, bucket)
            params[slot.role] = batch[slot.name].tolist() + [slot.fill] * (padded - live)
        return params

    def padded_to(self, batch: Mapping[str, torch.Tensor], shape: BatchRows, rows: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The batch with its row slots padded to ``rows`` with each slot's fill, on ``device``: what an eager
        step runs where every rank of a consensus group must see the same shapes."""
        padded = dict(batch)
        for slot in self.row_slots:
            fill = torch.full((rows - shape.rows, *slot.row_shape), slot.fill, dtype=slot.dtype, device=device)
            padded[slot.name] = torch.cat([batch[slot.name].to(device), fill])
        return padded

    # --- capture -----------------------------------------------------------------------------------------

    def fill_padding(self, bucket: int) -> None:
        """Every row of the bucket (and every request row) set to its slot's fill: what warm-ups and captures
        run with."""
        self.rows.fill_padding(bucket)
        self.requests.fill_padding(self.max_requests)

    def views(self, bucket: int) -> dict[str, torch.Tensor]:
        """The tensors a forward is captured with at ``bucket``."""
        return {**self.rows.views(bucket), **self.requests.views(self.max_requests)}

    def plan(self) -> dict[str, Any]:
        """What every rank of a group must agree on about the inputs before capturing."""

        def described(slots: Sequence[InputSlot]) -> list[tuple[str, str, tuple[int, ...]]]:
            return [(slot.name, str(slot.dtype), slot.row_shape) for slot in slots]

        return {
            "input slots": described(self.row_slots),
            "request slots": described(self.request_slots),
            "request rows": self.max_requests,
        }


def _check_query_lens(slot: InputSlot, query_lens: torch.Tensor, rows: int) -> None:
    """Refuse per-request token counts that do not fit the batch's token rows, as eager attention does.

    Checked on host values: a padded graph has room for more tokens than the batch holds, so the device would
    never complain, and reading a device tensor here would cost a sync on every step. A server has these
    counts on the host anyway (it scheduled them); it passes them as a CPU tensor.
    """
    if query_lens.device.type != "cpu":
        raise ValueError(
            f"input slot {slot.name!r} (role {slot.role}) must be passed as a host (CPU) tensor: the runner "
            f"checks that its counts fit the batch's {rows} token rows before replaying, and reading it from "
            f"{query_lens.device} would cost a device sync per step. The runner copies it to the device itself."
        )
    counts = query_lens.tolist()
    if any(count < 0 for count in counts):
        raise ValueError(f"input slot {slot.name!r} has a negative token count: {counts}")
    total = sum(counts)
    if total > rows:
        raise ValueError(
            f"input slot {slot.name!r} adds up to {total} tokens but the batch has only {rows} token rows; "
            "each request's new tokens must be packed into the token slots"
        )
