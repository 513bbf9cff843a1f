"""``graphhal bench --tp N``'s last table: per batch size, TP=1 against TP=N with each all-reduce path, and
how much of the TP=N step its all-reduces take.

The share is estimated from the per-size table (``all_reduce_sizes``): two all-reduces a layer (after
attention and after the MLP), each of batch x hidden values of the model's dtype, at the measured cost of the
path the step used (for the device's own: its faster kernel at that size), over the step's time in mode
full. That is the reference decoder's count; a model with another count of all-reduces a layer would need its
own figure.
"""

from __future__ import annotations

from graphhal.bench.all_reduce_sizes import AllReduceCost
from graphhal.bench.results import BenchResult
from hal import GraphMode

ALL_REDUCES_PER_LAYER = 2
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def render(tp: int, single: BenchResult, nccl: BenchResult, device: BenchResult | None, costs: list[AllReduceCost]) -> str:
    model = nccl.header.model
    layers, hidden, element = model["num_layers"], model["hidden_size"], _BYTES.get(nccl.header.dtype, 2)
    tp1 = _full_ms(single)
    paths = [("torch.distributed", _full_ms(nccl))] + ([("device", _full_ms(device))] if device is not None else [])
    lines = [f"\nTP={tp} against TP=1, mode full (ms per step; share: the step's all-reduces, from the per-size table):"]
    header = f"{'batch':>5}  {'TP=1':>8}" + "".join(f"  {f'TP={tp} ' + path:>24}  {'speed-up':>8}  {'share':>6}" for path, _ in paths)
    lines.append(header)
    for batch in sorted(set(tp1) & set(paths[0][1])):
        cells = f"{batch:>5}  {tp1[batch]:>8.3f}"
        for path, steps in paths:
            step = steps.get(batch)
            if step is None:
                cells += f"  {'-':>24}  {'-':>8}  {'-':>6}"
                continue
            one = _cost(costs, "torch.distributed" if path == "torch.distributed" else None, batch * hidden * element)
            share = f"{ALL_REDUCES_PER_LAYER * layers * one / 1000 / step:.0%}" if one is not None else "-"
            cells += f"  {step:>24.3f}  {tp1[batch] / step:>7.2f}x  {share:>6}"
        lines.append(cells)
    return "\n".join(lines)


def _full_ms(result: BenchResult) -> dict[int, float]:
    return {row.batch_size: row.median_ms for row in result.rows if row.mode == GraphMode.FULL}


def _cost(costs: list[AllReduceCost], path: str | None, nbytes: int) -> float | None:
    """Microseconds of one all-reduce of ``nbytes`` by ``path`` (None: the fastest device path), at the measured
    size nearest above it."""
    sized = [c for c in costs if c.microseconds is not None and c.nbytes >= nbytes and (c.path == path if path else c.path != "torch.distributed")]
    if not sized:
        return None
    nearest = min(c.nbytes for c in sized)
    return min(c.microseconds for c in sized if c.nbytes == nearest)  # type: ignore[type-var]
