"""The baseline of every size: the model's own step, called directly. It always runs, first; its output is
the reference every other contender's is checked against."""

from __future__ import annotations

from graphhal.bench.contenders.contender import Batch, Contender, Prepared
from graphhal.bench.names import EAGER
from graphhal.bench.workload import PrefillCase, Workload


class EagerDecode(Contender[Batch]):
    name = EAGER
    detail = "the model's decode step called directly"

    def prepare(self, workload: Workload, batch: Batch) -> Prepared:
        step = workload.decode_step
        return Prepared(run=lambda: step(**batch))


class EagerPrefill(Contender[PrefillCase]):
    name = EAGER

    def prepare(self, workload: Workload, case: PrefillCase) -> Prepared:
        forward, batch = case.forward, case.batch
        return Prepared(run=lambda: forward(**batch))
