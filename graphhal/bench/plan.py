"""What a bench run measures: a ``BenchPlan``, and the defaults that fill in what its caller left open.

Defaults depend on the device: on CPU a tiny model, three batch sizes and two prefill token counts, so the
whole run takes under a minute on 2 cores; on an accelerator the default-size reference model and the batch
sizes and token counts a server serves. Every contender is asked for; those the device cannot run are listed
as skipped with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

import hal
from graphhal.bench.timing import TimerSettings
from graphhal.refmodel import ModelConfig
from runners import PrefillConfig

MODELS = {"tiny": ModelConfig.tiny, "small": ModelConfig.small, "default": ModelConfig, "large": ModelConfig.large}
# Batch sizes of the dynamic=False reduce-overhead setup by default: both ends and two between, a compile each.
DEFAULT_STATIC_SIZES = (1, 8, 64, 256)


@dataclass(frozen=True)
class PrefillShape:
    """One prefill case: ``tokens`` new tokens in total, split as evenly as possible over ``requests``.

    A mixed case (``decodes`` > 0), as a chunked-prefill scheduler batches them: ``decodes`` requests with one
    new token each after ``decode_context`` cached tokens, and one chunk of ``tokens - decodes`` new tokens of
    a long prompt whose first ``chunk_context`` tokens were prefilled by earlier chunks.
    """

    tokens: int
    requests: int
    decodes: int = 0
    decode_context: int = 0
    chunk_context: int = 0

    @classmethod
    def mixed(cls, decodes: int, decode_context: int, chunk: int, chunk_context: int) -> "PrefillShape":
        return cls(chunk + decodes, decodes + 1, decodes, decode_context, chunk_context)

    def query_lens(self) -> list[int]:
        if self.decodes:
            return [self.tokens - self.decodes] + [1] * self.decodes
        base, extra = divmod(self.tokens, self.requests)
        return [base + (1 if i < extra else 0) for i in range(self.requests)]

    def context_lens(self) -> list[int]:
        if self.decodes:
            return [self.chunk_context] + [self.decode_context] * self.decodes
        return [0] * self.requests

    @property
    def label(self) -> str:
        if self.decodes:
            return f"mixed: {self.decodes} dec + {self.tokens - self.decodes} tok chunk"
        return f"{self.tokens} tok x{self.requests}"


def prefill_shapes(tokens: list[int], requests: list[int]) -> list[PrefillShape]:
    """Every token count split over every request count, where each request gets a token at least."""
    return [PrefillShape(t, r) for t in tokens for r in requests if r <= t]


@dataclass
class BenchPlan:
    """Everything one run measures.

    ``decode_modes`` None asks for every decode contender: one the device cannot run is listed as skipped with
    the reason (n/a). ``capture_max_bs`` None skips every capture-only measurement; ``compiled_setups`` off
    skips the compiled decode setups for every bucket up to it (CUDA only), ``static_sizes`` are the batch
    sizes the dynamic=False reduce-overhead setup compiles (the rest extrapolated); ``prefill_setup_max_tokens``
    None skips the prefill setup. ``cpu_threads``: torch's intra-op threads while a run on the cpu device
    measures.
    """

    device: hal.Device
    config: ModelConfig
    dtype: torch.dtype
    context_len: int
    batch_sizes: list[int]
    decode_modes: list[str] | None = None
    prefill_modes: list[str] = field(default_factory=list)
    prefill_shapes: list[PrefillShape] = field(default_factory=list)
    capture_max_bs: int | None = 256
    compiled_setups: bool = True
    restart_setups: bool = False  # decode setups in fresh processes, cold and warm (graphhal.bench.setup.restart)
    static_sizes: list[int] = field(default_factory=lambda: list(DEFAULT_STATIC_SIZES))
    prefill_setup_max_tokens: int | None = None
    timer: TimerSettings = field(default_factory=TimerSettings)
    cpu_threads: int = 1
    show_progress: bool = True
    seed: int = 0
    tp_group: Any = None  # the model is sharded over this process group's ranks (graphhal.bench.tensor_parallel)
    # A transformers model of this family (graphhal.bench.transformers_workload) instead of the reference model; ``config``
    # is then its cache's shape.
    transformers_family: str | None = None


class PlanDefaults:
    """What a run measures where its caller does not say: small on CPU, a server's view on a GPU."""

    def __init__(self, device: hal.Device) -> None:
        on_cpu = device.type == "cpu"
        self.model = "tiny" if on_cpu else "default"
        self.dtype = torch.float32 if on_cpu else torch.bfloat16
        self.batch_sizes = [1, 4, 16] if on_cpu else [1, 4, 16, 64, 256]
        self.context_len = 32 if on_cpu else 512
        self.tokens = [16, 64] if on_cpu else [16, 64, 256, 1024]
        # One mixed batch, as chunked prefill schedules it: decodes with long contexts beside a prompt's chunk.
        self.mixed = (
            PrefillShape.mixed(decodes=4, decode_context=24, chunk=16, chunk_context=16)
            if on_cpu
            else PrefillShape.mixed(decodes=32, decode_context=1024, chunk=256, chunk_context=512)
        )
        self.budget_s = 1.0 if on_cpu else 3.0
        # CUDA's clock is a pair of events around a sample's launches: the sync that ends a sample lies outside
        # it, so 10 ms samples time as well as 20 ms ones. They halve a round, and the eager row, host-bound and
        # noisy, holds every contender of its size to the full 50 rounds (about 8 s a size on an H100 at 20 ms).
        # Host clocks count the sync, so they keep 20 ms.
        self.min_sample_s = 0.01 if device.type == "cuda" else 0.02
        self.on_cpu = on_cpu

    def prefill_setup_max_tokens(self, config: ModelConfig) -> int:
        """PrefillConfig's own max_tokens (4096); on cpu no more than the model's max_seq_len (64 for the tiny
        model): the reference device keeps every bucket's tensors, so its 50 buckets up to 4096 tokens would
        take ~700 MiB and seconds there, to show what 10 buckets show as well."""
        default = PrefillConfig().max_tokens
        assert default is not None  # resolved by the config
        return min(default, config.max_seq_len) if self.on_cpu else default
