"""``PrefillRunner``: device graphs per token-count bucket for a model's prefill over packed requests.

    runner = PrefillRunner(prefill_step, token_slots, request_slots, "cuda:0", PrefillConfig(max_tokens=2048))
    runner.capture()
    logits = runner.run(batch)    # batch: token slots with one row per token (all requests packed),
                                  # request slots with one row per request (their lengths, block tables)

Padding: the token slots are padded to the token bucket with each slot's fill, and the request slots to
``max_requests`` rows, so a padded token belongs to no request (its lengths say so) and a padded request
has no tokens: neither can change a real output. Outputs are views into graph memory, overwritten by the
next ``run`` of any runner sharing the pool.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence


import hal
from runners.bucketed_runner import BucketedRunner
from runners.config import PrefillConfig
from runners.input_slots import InputSlot


class PrefillRunner(BucketedRunner):
    """Captures a prefill ``forward`` per token-count bucket and replays it for packed batches.

    forward:       callable taking the token and request slots as keyword tensors; returns tensors with the
                   token count as first dim (e.g. logits per token).
    token_slots:   per-token inputs (ids, positions, cache locations), padded to the bucket.
    request_slots: per-request inputs (query lengths, sequence lengths, block tables), padded to
                   ``config.max_requests`` rows; their fills must mark a request with no tokens.
    config:        ``PrefillConfig``: mode (auto, full, piecewise, breakable, disabled), max_tokens, buckets,
                   max_requests, compiler.
    request_outputs: the names of the forward's dict outputs that have one row per request rather than per
                   token (a sampler's tokens for each request's last token, say): padded to ``max_requests``
                   rows in the graphs, handed back with one row per live request.
    pool, watched_tensors, group, consensus_group: as for ``DecodeRunner``.

    A batch with more tokens than ``max_tokens`` or more requests than ``max_requests`` runs eagerly (or
    raises with eager fallback off).
    """

    phase = "prefill"
    batch_kind = hal.BatchKind.MIXED

    def __init__(
        self,
        forward: Callable[..., Any],
        token_slots: Sequence[InputSlot],
        request_slots: Sequence[InputSlot],
        device: "str | hal.Device",
        config: PrefillConfig | None = None,
        *,
        request_outputs: Sequence[str] = (),
        pool: Any = None,
        watched_tensors: Mapping[str, Any] | None = None,
        group: Any = None,
        consensus_group: Any = None,
    ) -> None:
        config = config or PrefillConfig()
        if not isinstance(config, PrefillConfig):
            raise TypeError(f"PrefillRunner takes a PrefillConfig, got {type(config).__name__}")
        overlap = sorted({s.name for s in token_slots} & {s.name for s in request_slots})
        if overlap:
            raise ValueError(f"slot names must differ between token and request slots; both have: {', '.join(overlap)}")
        if not request_slots:
            raise ValueError("a prefill runner needs request slots (at least the per-request lengths)")
        super().__init__(
            forward,
            token_slots,
            device,
            config,
            request_slots=request_slots,
            max_requests=config.max_requests,
            request_outputs=request_outputs,
            pool=pool,
            watched_tensors=watched_tensors,
            group=group,
            consensus_group=consensus_group,
        )
