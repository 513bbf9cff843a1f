"""The step costs of speculative decoding, timed together on one graph pool (``graphhal.bench.speculative``).

At each batch size: the generation loop's plain decode step (one token a request, greedy, the sampler in the
graph), the verify step at ``q = 1 + k`` for every ``k`` (the target over ``q`` tokens a request, the greedy
verdict in the graph: ``decode_runner(..., greedy_verify=True)``), and a draft model's plain decode step.
Every request has the same cached context (``context`` tokens before its new ones) in blocks of its own, and
the steps are interleaved round by round (``StepTimer.time_together``), so their ratios hold even where the
machine's speed drifts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import hal
from graphhal.bench.timing import StepTimer
from graphhal.sampling import SamplingParams, sampling_inputs
from graphhal.paged_attention.kv_cache import PagedKVCache
from runners import DecodeRunner


@dataclass
class StepCosts:
    """Median ms per step at one batch size: ``decode`` (the loop's), ``verify[k]``, ``draft``."""

    batch: int
    decode_ms: float
    verify_ms: dict[int, float] = field(default_factory=dict)
    draft_ms: float | None = None

    def verify_ratio(self, k: int) -> float:
        """The verify step at ``q = 1 + k`` over the plain decode step."""
        return self.verify_ms[k] / self.decode_ms


def step_batch(runner: DecodeRunner, kv_cache: PagedKVCache, batch: int, context: int, device: hal.Device) -> dict[str, torch.Tensor]:
    """A batch for ``runner`` (its ``query_tokens``): ``batch`` requests, each ``context`` cached tokens and its
    new ones in blocks of its own (request r's from block ``1 + r * per_request``), on the device."""
    q = getattr(runner, "query_tokens", 1)
    block_size = kv_cache.block_size
    per_request = -(-(context + q) // block_size)
    if 1 + batch * per_request > kv_cache.num_blocks:
        raise ValueError(f"the bench's cache holds {kv_cache.num_blocks} blocks; {batch} requests of {context + q} tokens need {1 + batch * per_request}")
    dtypes = {slot.name: slot.dtype for slot in runner.slots}
    first_block = 1 + torch.arange(batch)[:, None] * per_request
    tables = torch.zeros(batch, kv_cache.config.max_blocks_per_seq, dtype=torch.int64)
    tables[:, :per_request] = first_block + torch.arange(per_request)[None, :]
    positions = context + torch.arange(q)[None, :].expand(batch, q)
    slots = tables.gather(1, positions // block_size) * block_size + positions % block_size
    ids = (torch.arange(batch * q).reshape(batch, q) * 7 + 5) % 100 + 5
    squeeze: Callable[[torch.Tensor], torch.Tensor] = (lambda t: t) if q > 1 else (lambda t: t[:, 0])
    inputs = {
        "input_ids": squeeze(ids).to(dtypes["input_ids"]),
        "positions": squeeze(positions).to(dtypes["positions"]),
        "seq_lens": torch.full((batch,), context + q, dtype=dtypes["seq_lens"]),
        "block_tables": tables.to(dtypes["block_tables"]),
        "slot_mapping": squeeze(slots).to(dtypes["slot_mapping"]),
    }
    if "temperature" in dtypes:  # a sampling step: greedy, as the loop's greedy requests
        inputs.update(sampling_inputs([SamplingParams.greedy()] * batch, [0] * batch, "cpu"))
    return {name: tensor.to(device.torch_device) for name, tensor in inputs.items()}


def time_steps(
    timer: StepTimer,
    device: hal.Device,
    batch: int,
    context: int,
    decode: tuple[DecodeRunner, PagedKVCache],
    verify: dict[int, DecodeRunner],
    draft: tuple[DecodeRunner, PagedKVCache] | None,
) -> StepCosts:
    """Every step at ``batch`` requests, timed together; ``verify`` runners share ``decode``'s cache."""
    steps: dict[str, Callable[[], Any]] = {"decode": _replay(*decode, batch, context, device)}
    for k, runner in verify.items():
        steps[f"verify {k}"] = _replay(runner, decode[1], batch, context, device)
    if draft is not None:
        steps["draft"] = _replay(*draft, batch, context, device)
    timings = timer.time_together(steps)
    failed = {name: timing for name, timing in timings.items() if isinstance(timing, Exception)}
    if failed:
        name, error = next(iter(failed.items()))
        raise RuntimeError(f"the {name} step at batch {batch} failed: {type(error).__name__}: {error}") from error
    ms = {name: timing.median_s * 1e3 for name, timing in timings.items()}  # type: ignore[union-attr]
    return StepCosts(batch, ms["decode"], {k: ms[f"verify {k}"] for k in verify}, ms.get("draft"))


def _replay(runner: DecodeRunner, kv_cache: PagedKVCache, batch: int, context: int, device: hal.Device) -> Callable[[], Any]:
    inputs = step_batch(runner, kv_cache, batch, context, device)
    return lambda: runner.run(inputs)
