"""The decode step's inputs as named runner slots, with the fill each padded row gets."""

from __future__ import annotations

import torch

from hal import DeviceConventions, SlotRole
from graphhal.paged_attention.block_allocator import NULL_BLOCK
from graphhal.paged_attention.cache_layout import CacheLayout
from graphhal.paged_attention.kv_cache import NULL_SLOT
from runners import InputSlot


def decode_input_slots(
    config: CacheLayout,
    max_blocks_per_seq: int | None = None,
    conventions: DeviceConventions | None = None,
    *,
    query_tokens: int = 1,
) -> list[InputSlot]:
    """The slots of ``DecodeStep``: one row per request, ``max_blocks_per_seq`` block-table columns per row.

    ``query_tokens``: the new tokens per request (``q = 1 + k`` to verify ``k`` drafts; the runner's
    ``DecodeConfig(query_tokens=q)``). The per-token slots (``input_ids``, ``positions``, ``slot_mapping``) then
    have rows of ``(q,)``, token ``i`` of a request at ``positions[r, i]`` writing ``slot_mapping[r, i]``;
    ``seq_lens`` counts the cached context plus all ``q`` new tokens, and token ``i`` attends to the first
    ``seq_len - (q - 1 - i)`` of them (causal among the new tokens). With ``q = 1`` the rows are ``()``, as
    before.

    Fills make a padded row a harmless no-op: it embeds token 0 at position 0, attends to nothing
    (``seq_len`` 0 gives zeros, never NaN), and writes its K/V into the null block that no request owns. With
    ``q > 1`` its ``seq_len`` is ``q`` instead: its tokens attend to themselves in the null block (finite, never
    read back), since causal attention from the cached context on (npu's sparse_mode 3) takes no KV length
    below the query's ``q`` tokens.
    ``max_blocks_per_seq`` defaults to the layout's ``max_blocks_per_seq``; it must match the
    width of the block tables the server (or ``DecodeWorkload``) builds.

    ``seq_lens`` and ``slot_mapping`` declare their roles: a runner gives them the dtype (and the lengths
    their fill) the device's conventions ask for. With ``conventions`` (``Device.conventions``) the slots
    returned already carry them; without, they carry the defaults (what cpu and cuda use).
    """
    if max_blocks_per_seq is None:
        max_blocks_per_seq = config.max_blocks_per_seq
    if max_blocks_per_seq <= 0:
        raise ValueError(f"max_blocks_per_seq must be positive, got {max_blocks_per_seq}")
    if isinstance(query_tokens, bool) or not isinstance(query_tokens, int) or query_tokens < 1:
        raise ValueError(f"query_tokens must be a positive integer (1 + draft tokens per request), got {query_tokens!r}")
    tokens = (query_tokens,) if query_tokens > 1 else ()
    slots = [
        InputSlot("input_ids", torch.int64, row_shape=tokens, fill=0, per_token=True),
        InputSlot("positions", torch.int64, row_shape=tokens, fill=0, per_token=True),
        InputSlot("seq_lens", torch.int32, fill=query_tokens if query_tokens > 1 else 0, role=SlotRole.SEQ_LENS),
        InputSlot("block_tables", torch.int32, row_shape=(max_blocks_per_seq,), fill=NULL_BLOCK),
        InputSlot("slot_mapping", torch.int64, row_shape=tokens, fill=NULL_SLOT, role=SlotRole.CACHE_LOCATIONS, per_token=True),
    ]
    return [slot.for_device(conventions) for slot in slots] if conventions is not None else slots
