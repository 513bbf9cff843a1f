"""A request's sampling parameters, checked where the request arrives, and the slot tensors of a batch of them.

The sampler itself never checks: it runs inside a captured graph, where raising is impossible and reading a
value back to the host would stall the step. So whoever admits a request checks its parameters first
(``SamplingParams.check`` or ``check_sampling_params``), above all ``top_k <= max_top_k``: the sampler finds
top-k and top-p among ``max_top_k`` candidates, a number fixed when the graph is captured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from graphhal.sampling.sampling_slots import SAMPLING_SLOT_NAMES, sampling_slots

# A positive temperature below this is refused (0 is greedy): logits / temperature must stay finite in float32
# (1 / 1e-39 is already inf), and below it sampling is greedy in all but name. vLLM treats values under the same
# bound as greedy (_SAMPLING_EPS).
MIN_TEMPERATURE = 1e-5
_INT64 = torch.iinfo(torch.int64)


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. The defaults sample from the model's distribution unchanged.

    temperature: 0 for greedy (the argmax, as ``generate(do_sample=False)``), otherwise at least 1e-5.
    top_k:       keep the k most likely tokens (ties with the k-th kept too); 0 turns it off.
    top_p:       keep the fewest most likely tokens whose probability, after temperature and top-k, reaches
                 top_p (in (0, 1]); 1.0 turns it off. Cut at the sampler's ``max_top_k`` tokens.
    min_p:       keep tokens at least min_p times as likely as the most likely (in [0, 1]); 0 turns it off.
    seed:        the request's seed (any int64): with the same seed and prompt, the same tokens, always. None
                 (the default): the generation loop gives the request a seed of its own (from the loop's seed),
                 so identical requests draw different tokens; ``sampling_inputs`` needs a seed for a row that
                 samples.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None

    @classmethod
    def greedy(cls) -> "SamplingParams":
        return cls(temperature=0.0)

    def check(self, *, max_top_k: int, where: str = "sampling parameters") -> "SamplingParams":
        """``self`` if a sampler built with ``max_top_k`` can honour it; ValueError naming ``where`` otherwise."""
        check_sampling_params(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p, seed=self.seed,
            max_top_k=max_top_k, where=where,
        )
        return self


def check_sampling_params(
    *, temperature: float, top_k: int, top_p: float, min_p: float, seed: int | None, max_top_k: int, where: str = "sampling parameters"
) -> None:
    """ValueError (TypeError for a wrong type) saying which parameter is wrong, where, and what is allowed.

    ``max_top_k`` is the sampler's (``SampledStep.max_top_k``): a larger top_k cannot be served by its graphs.
    A ``seed`` of None is accepted: whoever admits the request gives it one (``GenerationLoop.add`` does).
    """
    _check_number(where, "temperature", temperature)
    if not math.isfinite(temperature) or temperature < 0 or 0 < temperature < MIN_TEMPERATURE:
        raise ValueError(
            f"{where}: temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}, got {temperature!r}"
        )
    _check_integer(where, "top_k", top_k)
    if not 0 <= top_k <= max_top_k:
        raise ValueError(
            f"{where}: top_k must be in 0..{max_top_k} (0 turns it off; {max_top_k} is the sampler's max_top_k, "
            f"fixed when its graphs were captured), got {top_k}"
        )
    _check_number(where, "top_p", top_p)
    if not 0 < top_p <= 1:
        raise ValueError(f"{where}: top_p must be in (0, 1] (1 turns it off), got {top_p!r}")
    _check_number(where, "min_p", min_p)
    if not 0 <= min_p <= 1:
        raise ValueError(f"{where}: min_p must be in [0, 1] (0 turns it off), got {min_p!r}")
    if seed is None:
        return
    _check_integer(where, "seed", seed)
    if not _INT64.min <= seed <= _INT64.max:
        raise ValueError(f"{where}: seed must fit int64 ({_INT64.min}..{_INT64.max}), got {seed}")


def sampling_inputs(
    params: Sequence[SamplingParams], counters: Sequence[int], device: torch.device | str
) -> dict[str, torch.Tensor]:
    """The sampling slots' tensors for a batch: one row per request, ``counters[i]`` being how many tokens
    request ``i`` has generated so far. Built on the host and copied to ``device`` once per tensor.

    A loop that keeps the tensors on the device between steps only needs ``counter += 1`` per step. A row that
    samples needs a seed (``SamplingParams(seed=...)``); a greedy row's seed draws nothing and may be None.
    """
    if len(params) != len(counters):
        raise ValueError(f"sampling_inputs: {len(params)} parameter sets but {len(counters)} counters")
    for row, counter in enumerate(counters):
        _check_integer(f"sampling_inputs row {row}", "counter", counter)
        if not 0 <= counter <= _INT64.max:
            raise ValueError(f"sampling_inputs row {row}: counter must be a non-negative int64, got {counter}")
    for row, p in enumerate(params):
        if p.seed is None and p.temperature != 0:
            raise ValueError(
                f"sampling_inputs row {row}: seed is None and the row samples (temperature {p.temperature}): give it "
                "a seed, SamplingParams(..., seed=...) (GenerationLoop.add gives one to a request added without)"
            )
    columns = {
        "temperature": [p.temperature for p in params],
        "top_k": [p.top_k for p in params],
        "top_p": [p.top_p for p in params],
        "min_p": [p.min_p for p in params],
        "seed": [0 if p.seed is None else p.seed for p in params],  # None: a greedy row, whose seed draws nothing
        "counter": list(counters),
    }
    dtypes = {slot.name: slot.dtype for slot in sampling_slots()}
    return {name: torch.tensor(columns[name], dtype=dtypes[name]).to(device) for name in SAMPLING_SLOT_NAMES}


def _check_number(where: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: {name} must be a number, got {value!r}")


def _check_integer(where: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {name} must be an int, got {value!r}")
