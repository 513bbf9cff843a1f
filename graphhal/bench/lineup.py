"""What a run will measure on its device, and what it will not and why, decided before anything is measured.

The contenders of each phase, the prefill shapes the model can take, the setup measurements, and the list
of what was skipped with the reason, in the order the table shows them: decode contenders, prefill
contenders, prefill shapes, compiled setups, prefill setups. Settled up front, so the progress bar knows
its length and the KV cache is sized for every prefill case before the model is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import hal
from graphhal.bench.contenders import PREFILL_CONTENDERS, PREFILL_MODES, Batch, Contender, decode_lineup, prefill_lineup
from graphhal.bench.contenders.registry import TRANSFORMERS_BASELINES
from graphhal.bench.names import DECODE, PREFILL, SETUP
from graphhal.bench.plan import BenchPlan, PrefillShape
from graphhal.bench.results import Skipped
from graphhal.bench.setup import compiled_setup, prefill_setup
from graphhal.bench.workload import PrefillCase


@dataclass
class Lineup:
    decode: list[Contender[Batch]]  # eager first
    prefill: list[Contender[PrefillCase]]  # eager first; empty when no prefill mode can run
    prefill_shapes: list[PrefillShape]  # the shapes the prefill contenders run at
    cache_shapes: list[PrefillShape]  # the prefill batches the KV cache must have room for, one at a time
    compiled_setups: list[str] = field(default_factory=list)  # names from compiled_setup.COMPILED_SETUPS
    prefill_setup_modes: list[str] = field(default_factory=list)
    prefill_setup_tokens: int | None = None  # None: no prefill setup
    prefill_setup_note: str = ""  # why prefill_setup_tokens is lower than asked, if it is
    skipped: list[Skipped] = field(default_factory=list)

    def timed_cases(self, batch_sizes: list[int]) -> int:
        """Contender-size pairs timed: the length of the progress bar."""
        return len(self.decode) * len(batch_sizes) + len(self.prefill) * len(self.prefill_shapes)


def choose_lineup(plan: BenchPlan) -> Lineup:
    device, skipped = plan.device, []
    transformers = plan.transformers_family is not None
    decode = _runnable(decode_lineup(plan.decode_modes, device, transformers_baselines=transformers), DECODE, device, skipped)
    if not transformers:  # named, but the reference model has no transformers step to time
        skipped += [
            Skipped(DECODE, name, "needs a transformers model (--model llama, qwen2 or mistral)")
            for name in plan.decode_modes or () if name in TRANSFORMERS_BASELINES
        ]
    prefill: list[Contender[PrefillCase]] = []
    if plan.prefill_modes and plan.prefill_shapes:
        eager, *modes = prefill_lineup(plan.prefill_modes, device)
        modes = _runnable(modes, PREFILL, device, skipped)
        prefill = [eager, *modes] if modes else []
    shapes = [shape for shape in plan.prefill_shapes if _fits(shape, plan, skipped)] if prefill else []
    lineup = Lineup(decode, prefill, shapes, cache_shapes=list(plan.prefill_shapes), skipped=skipped)
    if plan.capture_max_bs is None:  # the setup measurements come with the capture cost, or not at all
        return lineup
    if plan.compiled_setups:
        reasons = compiled_setup.skip_reasons(device)
        skipped += [Skipped(SETUP, name, reasons[name]) for name in compiled_setup.COMPILED_SETUPS if name in reasons]
        lineup.compiled_setups = [name for name in compiled_setup.COMPILED_SETUPS if name not in reasons]
    if plan.prefill_setup_max_tokens is not None:
        tokens, note = prefill_setup.setup_tokens(plan.config, plan.prefill_setup_max_tokens)
        lineup.prefill_setup_tokens, lineup.prefill_setup_note = tokens, note
        # The KV cache also holds the prefill setup's largest batch, so each bucket it captures could be filled.
        lineup.cache_shapes.append(prefill_setup.cache_shape(plan.config, tokens))
        for mode in PREFILL_MODES:
            reason = PREFILL_CONTENDERS[mode](device).skip_reason(device)
            if reason is None:
                lineup.prefill_setup_modes.append(mode)
            else:
                skipped.append(Skipped(SETUP, f"prefill {mode}", reason))
    return lineup


def _runnable(contenders: list[Contender], phase: str, device: hal.Device, skipped: list[Skipped]) -> list[Contender]:
    """The contenders ``device`` can run; the others go to ``skipped`` with the reason."""
    runnable = []
    for contender in contenders:
        reason = contender.skip_reason(device)
        if reason is None:
            runnable.append(contender)
        else:
            skipped.append(Skipped(phase, contender.name, reason))
    return runnable


def _fits(shape: PrefillShape, plan: BenchPlan, skipped: list[Skipped]) -> bool:
    # A request holds its cached context and its new tokens: both must fit the model's sequence length.
    longest = max(context + query for context, query in zip(shape.context_lens(), shape.query_lens()))
    max_seq_len = plan.config.max_seq_len
    if longest > max_seq_len:
        reason = f"{longest} tokens per request (context and new tokens) exceed the model's max_seq_len {max_seq_len}"
        skipped.append(Skipped(PREFILL, shape.label, reason))
        return False
    return True
