"""Prefill setup: one ``PrefillRunner`` per mode capturing every default prefill bucket, as a server would.

``PrefillConfig`` defaults (token buckets 4..4096, 64 requests) except ``max_tokens``, which a run may lower
(the cpu default, see ``PlanDefaults``) and which is capped where the model could never be handed that many
tokens at once: ``max_requests`` requests of at most ``max_seq_len`` tokens each. The bench's KV cache is
sized to hold one such batch (``cache_shape``), so every bucket captured is one a server could fill.
Runs on every device: piecewise compiles once (torch.compile, token dim dynamic) and captures its pieces
per bucket; breakable compiles nothing and captures segments around attention.
"""

from __future__ import annotations

from functools import partial

from graphhal.bench.measurements import Measurements, release_memory
from graphhal.bench.names import SETUP
from graphhal.bench.results import Failed, PoolShare, PrefillSetup
from graphhal.bench.setup.setup_meter import metered_setup
from graphhal.bench.plan import PrefillShape
from graphhal.bench.workload import Workload
from graphhal.refmodel import ModelConfig
from runners import PrefillConfig, PrefillRunner


def measure_prefill_setups(
    workload: Workload, modes: list[str], max_tokens: int, measurements: Measurements, show_progress: bool
) -> list[PrefillSetup]:
    """The prefill setup in each of ``modes``, each measured apart (a compiled forward of an earlier one is
    neither reused nor called again); those that fail are recorded and left out."""
    setups = []
    for mode in modes:
        measurements.describe(f"setup: prefill {mode} (buckets up to {max_tokens} tokens)")
        measure = partial(prefill_setup, workload, mode, max_tokens, show_progress)
        setup = measurements.attempt(SETUP, f"prefill {mode}", f"buckets up to {max_tokens} tokens", measure)
        if not isinstance(setup, Failed):
            setups.append(setup)
    return setups


def setup_tokens(config: ModelConfig, requested: int) -> tuple[int, str]:
    """``max_tokens`` for the prefill setup, and why it is lower than ``requested`` ("" when it is not)."""
    max_requests = PrefillConfig.max_requests  # the field's default: the setup keeps it
    limit = max_requests * config.max_seq_len
    if requested <= limit:
        return requested, ""
    return limit, (
        f"prefill setup: max_tokens capped at {limit} (asked {requested}): {max_requests} requests "
        f"(PrefillConfig's max_requests) of at most max_seq_len {config.max_seq_len} tokens hold no more"
    )


def cache_shape(config: ModelConfig, max_tokens: int) -> PrefillShape:
    """The largest batch the prefill setup's runners accept, as requests the bench's KV cache must hold."""
    return PrefillShape(max_tokens, -(-max_tokens // config.max_seq_len))


def prefill_setup(workload: Workload, mode: str, max_tokens: int, show_progress: bool) -> PrefillSetup:
    """A ``PrefillRunner`` in ``mode`` built and captured for every default bucket up to ``max_tokens``, with its
    pool against the largest bucket captured alone and the estimate it made before the other buckets."""
    device = workload.device
    phase = PrefillConfig(mode=mode, max_tokens=max_tokens, show_progress=show_progress)
    assert phase.buckets is not None

    def runner(buckets: list[int], progress: bool = False) -> PrefillRunner:
        config = PrefillConfig(mode=mode, buckets=buckets, show_progress=progress)
        return PrefillRunner(workload.prefill_forward(), *workload.prefill_slots(), device, config)

    # Kept alive throughout: the first capture on the stream holds cuBLAS's workspace (``pool_share``).
    first = runner([phase.buckets[0]])
    first.capture()
    alone = runner([phase.buckets[-1]])
    pool_largest = alone.capture().pool_bytes
    alone.close()
    del alone
    release_memory(device)
    with metered_setup(device) as meter:
        every = runner(phase.buckets, show_progress)
        estimate = every.estimate_pool_bytes()
        report = every.capture()
    first.close()
    share = PoolShare("prefill", mode, len(report.buckets), phase.buckets[-1], report.pool_bytes, pool_largest, estimate)
    return PrefillSetup(
        mode=mode,
        max_tokens=max_tokens,
        max_requests=phase.max_requests,
        num_buckets=len(report.buckets),
        setup_s=meter.setup_s,
        compiles=meter.compiles,
        pool_bytes=report.pool_bytes,
        pool=share,
    )
