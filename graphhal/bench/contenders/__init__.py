"""The contenders: everything a bench run times against eager, set up afresh per size.

    contender        what a contender is (``Contender``, ``Prepared``)
    registry         every contender by name, per phase, in table order
    eager            the baseline: the model's step called directly
    runner_modes     graphhal: ``DecodeRunner`` / ``PrefillRunner`` in one mode, one bucket
    floor            the same step captured by hand, no graphhal in between
    reduce_overhead  torch.compile's peer, and the recipe the compiled setup follows too
    static_buffers   static input buffers as a server keeps them for a graph
"""

from graphhal.bench.contenders.contender import Batch, Contender, Prepared
from graphhal.bench.contenders.registry import (
    DECODE_CONTENDERS,
    PREFILL_CONTENDERS,
    PREFILL_MODES,
    decode_lineup,
    prefill_lineup,
)

__all__ = [
    "DECODE_CONTENDERS",
    "PREFILL_CONTENDERS",
    "PREFILL_MODES",
    "Batch",
    "Contender",
    "Prepared",
    "decode_lineup",
    "prefill_lineup",
]
