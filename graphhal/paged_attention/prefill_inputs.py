"""The prefill step's inputs as named runner slots: one list per packed token, one per request.

A prefill batch has two row counts: ``T`` packed tokens and ``R`` requests (a fixed maximum). A runner pads
each list to its own size (token slots to the token bucket, request slots to ``R``) with these fills.
"""

from __future__ import annotations

import torch

from hal import SlotRole
from graphhal.paged_attention.block_allocator import NULL_BLOCK
from graphhal.paged_attention.cache_layout import CacheLayout
from graphhal.paged_attention.kv_cache import NULL_SLOT
from runners import InputSlot


def prefill_token_slots() -> list[InputSlot]:
    """The per-token slots of ``PrefillStep``: ``input_ids``, ``positions``, ``slot_mapping``.

    A padded token embeds token 0 at position 0 and writes its K/V into the null block that no request owns;
    it belongs to no request (it sits past ``sum(query_lens)``), so attention gives it zeros.
    """
    return [
        InputSlot("input_ids", torch.int64, fill=0),
        InputSlot("positions", torch.int64, fill=0),
        InputSlot("slot_mapping", torch.int64, fill=NULL_SLOT, role=SlotRole.CACHE_LOCATIONS),
    ]


# What a prefill step returns with one row per request when it computes logits only at ``logits_rows``: the
# runner's ``request_outputs``.
PREFILL_ROW_OUTPUTS = ("logits",)


def logits_rows_slot() -> InputSlot:
    """The request slot naming, per request, the packed token row whose logits the step computes (its last
    token for sampling). A padded request reads row 0: its logits are computed and never used."""
    return InputSlot("logits_rows", torch.int64, fill=0)


def prefill_request_slots(
    config: CacheLayout, max_blocks_per_seq: int | None = None, *, logits_rows: bool = False
) -> list[InputSlot]:
    """The per-request slots of ``PrefillStep``: ``query_lens``, ``seq_lens``, ``block_tables``.

    A padded request has no new tokens (``query_len`` 0), which is what makes attention skip it; its
    ``seq_len`` 0 and null-block table say the same to anything else reading them. ``max_blocks_per_seq``
    defaults to the layout's ``max_blocks_per_seq`` and must match the block tables' width.

    ``seq_lens`` declares the SEQ_LENS role (a device may choose its dtype and fill). ``query_lens`` declares
    QUERY_LENS: it is passed on the host, and a runner refuses counts that add up to more tokens than the
    batch holds, as eager attention does (a graph padded to its bucket would not notice).

    ``logits_rows``: add ``logits_rows_slot()`` for a step that computes logits only at those rows.
    """
    if max_blocks_per_seq is None:
        max_blocks_per_seq = config.max_blocks_per_seq
    if max_blocks_per_seq <= 0:
        raise ValueError(f"max_blocks_per_seq must be positive, got {max_blocks_per_seq}")
    return [
        InputSlot("query_lens", torch.int32, fill=0, role=SlotRole.QUERY_LENS),
        InputSlot("seq_lens", torch.int32, fill=0, role=SlotRole.SEQ_LENS),
        InputSlot("block_tables", torch.int32, row_shape=(max_blocks_per_seq,), fill=NULL_BLOCK),
        *([logits_rows_slot()] if logits_rows else []),
    ]
