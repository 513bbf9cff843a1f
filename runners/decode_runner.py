"""``DecodeRunner``: device graphs per batch-size bucket for a model's decode step.

    runner = DecodeRunner(model_step, slots, device="cuda:0", config=DecodeConfig(max_bs=64))
    runner.capture()                       # logs one summary line, returns a CaptureReport
    logits = runner.run(batch)             # batch: {slot name: tensor with one row per request}

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
    batch_kind = hal.BatchKind.UNIFORM_DECODE

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
        super().__init__(
            forward, slots, device, config, pool=pool, watched_tensors=watched_tensors, group=group, consensus_group=consensus_group
        )
