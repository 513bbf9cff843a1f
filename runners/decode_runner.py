"""``DecodeRunner``: device graphs per batch-size bucket for a model's decode step.

    runner = DecodeRunner(model_step, slots, device="cuda:0", config=DecodeConfig(max_bs=64))
    runner.capture()                       # logs one summary line, returns a CaptureReport
    logits = runner.run(batch)             # batch: {slot name: tensor with one row per request}

Uniform multi-token steps (speculative verification of ``k`` drafts: ``q = 1 + k`` query tokens per request):

    slots = decode_input_slots(layout, query_tokens=3)      # input_ids, positions, slot_mapping: rows of (3,)
    verify = DecodeRunner(model_step, slots, "cuda:0", DecodeConfig(max_bs=64, query_tokens=3), pool=plain.pool)
    logits = verify.run(batch)             # [requests, 3, vocab]

A row is one request at every ``q``: per-token slots (``InputSlot(per_token=True)``) carry ``q`` first in their
row shape, per-request slots (``seq_lens``, ``block_tables``) do not; buckets count requests, and padding adds
whole requests only (a padded request attends to nothing and writes the null slot), so a padded batch never
holds a partial request. Its batches are ``hal.BatchKind.UNIFORM_BATCH``: mode ``auto`` captures ``full`` where
every declared op allows those (``hal.GraphSupport.UNIFORM_BATCH`` or ``ANY_BATCH``), piecewise or breakable
otherwise. ``seq_lens`` count the ``q`` new tokens (their K/V are written at ``slot_mapping`` first).

Outputs of ``run`` are views into graph memory. The next ``run`` (of any bucket: all graphs share one
pool) overwrites them, so consume or copy them before the next step.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence


import hal
from runners.bucketed_runner import BucketedRunner
from runners.config import DecodeConfig
from runners.input_slots import InputSlot


class DecodeRunner(BucketedRunner):
    """Captures ``forward`` per batch-size bucket on ``device`` and replays it for live batches.

    forward:        any callable taking the slots as keyword tensors, ``(rows, *row_shape)`` each, and
                    returning a tensor or nested dict/tuple/list of tensors with ``rows`` as first dim.
                    Rows must be independent: padded rows must not change real rows' results.
    slots:          the named inputs (``InputSlot``), with the fill padded rows get.
    device:         a device name ("cuda:0", "cpu") or a ``hal.Device``.
    config:         ``DecodeConfig``: mode (auto, full, breakable, piecewise, disabled), max_bs, buckets, compiler...
    pool:           a graph pool to share with another runner that never replays at the same time
                    (decode and prefill); default: a new pool for this runner.
    watched_tensors: what the forward reads that lives outside the runner, by name: tensors, modules (their
                    parameters and buffers) or objects holding tensors (a KV cache). Their addresses are
                    checked, like the static inputs', before every replay (``check_addresses``): a cache
                    re-allocated or weights swapped with ``param.data = ...`` after capture would otherwise
                    be read at their old addresses.
    group:          a ``torch.distributed`` process group whose ranks capture together (tensor parallel: the
                    forward's collectives are captured). Every rank agrees on what to capture before the
                    capture, synchronizes and meets after each warm-up, and agrees on success after each
                    bucket: a mismatch or a failure is a ``CaptureError`` on every rank, never a hang. Every
                    rank must then run the same batches (a server broadcasts them).
    consensus_group: a process group whose ranks also agree on every ``run`` (data parallel): all pad to the
                    bucket of the largest batch across ranks and all take graphs or all run eagerly; a rank
                    with no work passes an empty batch and runs a padded idle step. One host all-gather per
                    step.
    """

    phase = "decode"
    batch_kind = hal.BatchKind.UNIFORM_DECODE  # UNIFORM_BATCH for a runner with query_tokens > 1

    def __init__(
        self,
        forward: Callable[..., Any],
        slots: Sequence[InputSlot],
        device: "str | hal.Device",
        config: DecodeConfig | None = None,
        *,
        pool: Any = None,
        watched_tensors: Mapping[str, Any] | None = None,
        group: Any = None,
        consensus_group: Any = None,
    ) -> None:
        config = config or DecodeConfig()
        if not isinstance(config, DecodeConfig):
            raise TypeError(f"DecodeRunner takes a DecodeConfig, got {type(config).__name__}")
        check_query_token_slots(slots, config.query_tokens)
        self.query_tokens = config.query_tokens
        if config.query_tokens > 1:
            self.batch_kind = hal.BatchKind.UNIFORM_BATCH
        super().__init__(
            forward, slots, device, config, pool=pool, watched_tensors=watched_tensors, group=group, consensus_group=consensus_group
        )


def check_query_token_slots(slots: Sequence[InputSlot], query_tokens: int) -> None:
    """ValueError naming the slot unless every per-token slot carries ``query_tokens`` tokens per row.

    A slot that held fewer (or more) tokens than the runner's ``q`` would shift every request's tokens onto
    its neighbour's: the runner pads whole requests, and that is only whole if each row is one.
    """
    per_token = [slot for slot in slots if slot.per_token]
    if query_tokens > 1 and not per_token:
        raise ValueError(
            f"a DecodeRunner with query_tokens={query_tokens} needs its per-token slots marked: InputSlot(..., "
            f"per_token=True) with row_shape ({query_tokens}, ...), as decode_input_slots(layout, "
            f"query_tokens={query_tokens}) builds them; none of {', '.join(slot.name for slot in slots)} is"
        )
    for slot in slots:
        if slot.role == hal.SlotRole.CACHE_LOCATIONS and query_tokens > 1 and not slot.per_token:
            raise ValueError(
                f"input slot {slot.name!r} (role {slot.role}) holds the cache slot of every new token: with "
                f"query_tokens={query_tokens} mark it per_token=True with row_shape ({query_tokens},)"
            )
        if not slot.per_token:
            continue
        tokens = slot.row_shape[0] if slot.row_shape else 1
        if tokens != query_tokens:
            hint = "" if query_tokens > 1 else f"; for {tokens} tokens per request use DecodeConfig(query_tokens={tokens})"
            raise ValueError(
                f"input slot {slot.name!r} is per-token with row_shape {slot.row_shape}, but the runner's query_tokens is "
                f"{query_tokens}: its rows must be ({query_tokens}, ...), one row per request holding its "
                f"{query_tokens} new token{'s' if query_tokens > 1 else ''}{hint}"
            )
