"""Device conventions for the inputs a model step reads: what runners ask the device instead of hard-coding.

Attention kernels differ per vendor in what they accept: Ascend's take cache locations as int32 and
per-request lengths as host lists whose padded entries must be 0, CUDA kernels commonly take int64 slot
indices. A runner never picks these itself. An input slot says which role it plays (``SlotRole``), and the
runner takes that slot's dtype and pad fill from ``Device.conventions``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class SlotRole:
    """Roles an input slot can declare: the device decides the dtype and fill of cache locations and
    sequence lengths (``DeviceConventions``); query lengths keep theirs and are checked by the runner."""

    CACHE_LOCATIONS = "cache_locations"  # the KV-cache slot each token writes (slot mapping)
    SEQ_LENS = "seq_lens"  # per-request lengths attention reads; on devices that bake host values, updated per run
    # Per-request new-token counts of a packed (prefill) batch. Passed on the host: the runner checks before
    # every replay that they fit the batch's token rows, which a graph padded to its bucket cannot see.
    QUERY_LENS = "query_lens"

    ALL = (CACHE_LOCATIONS, SEQ_LENS, QUERY_LENS)


@dataclass(frozen=True)
class DeviceConventions:
    """What a device's kernels expect for the role slots.

    cache_location_dtype: dtype of cache-location (slot mapping) inputs.
    seq_len_dtype:        dtype of per-request length inputs.
    seq_len_fill:         the length padded rows get: one the device's attention treats as an empty request.
    """

    cache_location_dtype: torch.dtype = torch.int64
    seq_len_dtype: torch.dtype = torch.int32
    seq_len_fill: int = 0
