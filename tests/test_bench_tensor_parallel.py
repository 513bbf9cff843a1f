"""``graphhal bench --tp 2`` on two cpu ranks over gloo: every part runs and reports.

The figures are the GPUs' to give; here the run's shape is checked: the device's own all-reduce is named (or
why there is none), the step tables per all-reduce path, TP=1, one all-reduce per message size and path with
the fastest per size, and the summary with each step's all-reduce share.
"""

from __future__ import annotations

import re

import pytest

from graphhal.bench.all_reduce_sizes import AllReduceCost, fastest_by_size
from graphhal.cli.main import main


@pytest.mark.cpu
def test_the_tensor_parallel_bench_reports_each_path_the_sizes_and_the_all_reduce_share(capsys):
    argv = [
        "bench", "--tp", "2", "--device", "cpu", "--model", "tiny", "--batch-sizes", "1,2", "--modes", "full",
        "--time-budget", "0.02", "--min-repeats", "3", "--max-repeats", "3", "--no-progress", "--no-capture-cost",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "the device's own all-reduce: none here: the device offers none" in out  # cpu: gloo for every message
    assert "TP=2, every all-reduce through torch.distributed:" in out and "the same model on one device (TP=1):" in out
    sizes = re.findall(r"^ +(\d+ KiB) +[\d.]+ +torch\.distributed$", out, re.MULTILINE)
    assert sizes == ["2 KiB", "4 KiB", "8 KiB", "16 KiB", "32 KiB", "64 KiB", "128 KiB", "256 KiB"]
    summary = re.findall(r"^ +([12]) +[\d.]+ +[\d.]+ +[\d.]+x +(\d+)%$", out, re.MULTILINE)
    assert [batch for batch, _ in summary] == ["1", "2"] and all(0 < int(share) for _, share in summary)


def test_the_fastest_path_is_chosen_per_size_and_a_declined_size_never_wins():
    costs = [
        AllReduceCost("torch.distributed", 2048, 16.0), AllReduceCost("one-shot", 2048, 9.0), AllReduceCost("two-shot", 2048, 11.0),
        AllReduceCost("torch.distributed", 1 << 20, 40.0), AllReduceCost("one-shot", 1 << 20, 55.0), AllReduceCost("two-shot", 1 << 20, 30.0),
        AllReduceCost("torch.distributed", 1 << 26, 900.0), AllReduceCost("one-shot", 1 << 26, None), AllReduceCost("two-shot", 1 << 26, None),
    ]
    assert fastest_by_size(costs) == {2048: "one-shot", 1 << 20: "two-shot", 1 << 26: "torch.distributed"}
