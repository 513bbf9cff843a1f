"""Every contender a run can ask for, by name, per phase, in table order.

Eager is in no table: it always runs, first, as the baseline of its size. A contender is one entry (a
factory taking the device). Mixed batches (decodes beside a prompt's chunk) are prefill shapes: every prefill
contender runs them.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import hal
from graphhal.bench.contenders.contender import Batch, Contender
from graphhal.bench.contenders.eager import EagerDecode, EagerPrefill
from graphhal.bench.contenders.floor import HandWrittenFloor
from graphhal.bench.contenders.reduce_overhead import ReduceOverhead
from graphhal.bench.contenders.runner_modes import DecodeRunnerMode, PrefillRunnerMode
from graphhal.bench.contenders.transformers_baselines import TransformersEager, TransformersStaticCompile
from graphhal.bench.names import (
    FLOOR,
    FULL_FIRST_REPLAY_CHECK,
    FULL_INDUCTOR,
    REDUCE_OVERHEAD,
    TRANSFORMERS_EAGER,
    TRANSFORMERS_STATIC_COMPILE,
)
from graphhal.bench.workload import PrefillCase

RUNNER_MODES = (hal.GraphMode.FULL, hal.GraphMode.BREAKABLE, hal.GraphMode.PIECEWISE)

DECODE_CONTENDERS: dict[str, Callable[[hal.Device], Contender[Batch]]] = {
    FLOOR: HandWrittenFloor,
    **{mode.value: (lambda device, mode=mode: DecodeRunnerMode(mode.value)) for mode in RUNNER_MODES},
    FULL_INDUCTOR: lambda device: DecodeRunnerMode(hal.GraphMode.FULL.value, compiler=hal.Compiler.INDUCTOR.value),
    # The same full graphs with addresses checked only on a bucket's first replay: what checking before
    # every replay (the default) costs is the difference to "full".
    FULL_FIRST_REPLAY_CHECK: lambda device: DecodeRunnerMode(hal.GraphMode.FULL.value, check_addresses="first_replay"),
    REDUCE_OVERHEAD: lambda device: ReduceOverhead(),
}

# transformers' own decode steps: after graphhal's contenders when the model is a transformers one (named in
# --modes like the others; all of them when no modes are named).
TRANSFORMERS_BASELINES: dict[str, Callable[[], Contender[Batch]]] = {
    TRANSFORMERS_EAGER: TransformersEager,
    TRANSFORMERS_STATIC_COMPILE: TransformersStaticCompile,
}

PREFILL_CONTENDERS: dict[str, Callable[[hal.Device], Contender[PrefillCase]]] = {
    mode.value: (lambda device, mode=mode: PrefillRunnerMode(mode.value)) for mode in RUNNER_MODES
}
PREFILL_MODES = tuple(PREFILL_CONTENDERS)


def decode_lineup(names: Iterable[str] | None, device: hal.Device, *, transformers_baselines: bool = False) -> list[Contender[Batch]]:
    """Eager, then the named decode contenders (None: all of them), whether ``device`` can run them or not;
    then, for a transformers model, transformers' own decode steps.

    In table order whatever the order named: every size's rows read eager, floor, full, ... the same way.
    """
    if names is None:
        names = [*DECODE_CONTENDERS, *TRANSFORMERS_BASELINES]
    else:
        names = list(names)
        _known({**DECODE_CONTENDERS, **TRANSFORMERS_BASELINES}, names, "decode mode")
    baselines = [make() for name, make in TRANSFORMERS_BASELINES.items() if name in names] if transformers_baselines else []
    return [EagerDecode(), *(make(device) for name, make in DECODE_CONTENDERS.items() if name in names), *baselines]


def prefill_lineup(names: Iterable[str], device: hal.Device) -> list[Contender[PrefillCase]]:
    """Eager, then the named prefill contenders in the order named, whether ``device`` can run them or not."""
    names = _known(PREFILL_CONTENDERS, names, "prefill mode")
    return [EagerPrefill(), *(PREFILL_CONTENDERS[name](device) for name in names)]


def _known(table: Mapping[str, object], names: Iterable[str], what: str) -> list[str]:
    names = list(names)
    unknown = sorted(set(names) - table.keys())
    if unknown:
        raise ValueError(f"unknown {what}(s) {', '.join(unknown)}; known: {', '.join(table)}")
    return names
