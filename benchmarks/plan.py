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
from benchmarks.timing import TimerSettings
from refmodel import ModelConfig
from runners import PrefillConfig

MODELS = {"tiny": ModelConfig.tiny, "default": ModelConfig, "large": ModelConfig.large}
# Batch sizes of the dynamic=False reduce-overhead setup by default: both ends and two between, a compile each.
DEFAULT_STATIC_SIZES = (1, 8, 64, 256)


@dataclass(frozen=True)
class PrefillShape:
    """One prefill case: ``tokens`` new tokens in total, split as evenly as possible over ``requests``."""

    tokens: int
    requests: int

    def query_lens(self) -> list[int]:
        base, extra = divmod(self.tokens, self.requests)
        return [base + (1 if i < extra else 0) for i in range(self.requests)]

    @property
    def label(self) -> str:
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
    static_sizes: list[int] = field(default_factory=lambda: list(DEFAULT_STATIC_SIZES))
    prefill_setup_max_tokens: int | None = None
    timer: TimerSettings = field(default_factory=TimerSettings)
    cpu_threads: int = 1
    show_progress: bool = True
    seed: int = 0
    tp_group: Any = None  # the model is sharded over this process group's ranks (benchmarks.tensor_parallel)


class PlanDefaults:
    """What a run measures where its caller does not say: small on CPU, a server's view on a GPU."""

    def __init__(self, device: hal.Device) -> None:
        on_cpu = device.type == "cpu"
        self.model = "tiny" if on_cpu else "default"
        self.dtype = torch.float32 if on_cpu else torch.bfloat16
        self.batch_sizes = [1, 4, 16] if on_cpu else [1, 4, 16, 64, 256]
        self.context_len = 32 if on_cpu else 512
        self.tokens = [16, 64] if on_cpu else [16, 64, 256, 1024]
        self.budget_s = 1.0 if on_cpu else 3.0
        self.on_cpu = on_cpu

    def prefill_setup_max_tokens(self, config: ModelConfig) -> int:
        """PrefillConfig's own max_tokens (4096); on cpu no more than the model's max_seq_len (64 for the tiny
        model): the reference device keeps every bucket's tensors, so its 50 buckets up to 4096 tokens would
        take ~700 MiB and seconds there, to show what 10 buckets show as well."""
        default = PrefillConfig().max_tokens
        assert default is not None  # resolved by the config
        return min(default, config.max_seq_len) if self.on_cpu else default
