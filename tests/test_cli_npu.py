"""``graphhal bench`` and ``graphhal demo`` on the npu device, end to end, on the CPU SIMULATOR of every
torch_npu line: what a new user types first on an Ascend machine. A short plan (the small model, two sizes)
keeps each run to seconds; every graph row must print and nothing may fail.

Both commands run in this process with the simulator installed (``npu_simulated_on_cpu``): the same
``graphhal.cli.main`` the ``graphhal`` command calls.
"""

from __future__ import annotations

import re

import pytest
import torch

from graphhal.cli.main import main
from support.npu_simulator.fixture import PROFILE_PARAMS, npu_simulated_on_cpu

pytestmark = pytest.mark.cpu

DECODE_ROWS = ("eager", "floor", "full", "breakable", "piecewise", "full (first-replay check)")
PREFILL_ROWS = ("eager", "full", "breakable", "piecewise")
BATCH_SIZES = (1, 2)
SHORT = ["--no-progress", "--min-repeats", "1", "--max-repeats", "1", "--time-budget", "0.05"]


def _rows(section: str) -> set[tuple[str, ...]]:
    """(size..., mode) of every timed row of a table section: sizes are the leading numeric columns."""
    rows = set()
    for line in section.splitlines():
        match = re.match(r"^\s*(\d+)\s+(?:(\S+)\s+)?(eager|floor|full \(first-replay check\)|full|breakable|piecewise)\s+\d", line)
        if match:
            rows.add(tuple(part for part in match.groups() if part is not None))
    return rows


@pytest.mark.parametrize("profile", [param.values[0] for param in PROFILE_PARAMS], ids=[param.id for param in PROFILE_PARAMS])
def test_graphhal_bench_runs_end_to_end_on_npu_with_every_graph_row(profile, capsys):
    torch._dynamo.reset()
    arguments = [
        "bench", "--device", "npu:0", "--model", "small", "--context-len", "24",
        "--batch-sizes", ",".join(map(str, BATCH_SIZES)), "--tokens", "16", "--requests", "2", "--capture-max-bs", "2",
        *SHORT,
    ]
    with npu_simulated_on_cpu(profile):
        code = main(arguments)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "FAILED" not in out
    decode, _, rest = out.partition("\nprefill\n")
    assert {(str(size), mode) for size in BATCH_SIZES for mode in DECODE_ROWS} <= _rows(decode), decode
    assert {("16", "2", mode) for mode in PREFILL_ROWS} <= _rows(rest), rest
    assert "capture: 2 decode buckets up to 2" in out


@pytest.mark.parametrize("profile", [param.values[0] for param in PROFILE_PARAMS], ids=[param.id for param in PROFILE_PARAMS])
def test_graphhal_demo_runs_end_to_end_on_npu(profile, capsys):
    arguments = ["demo", "--device", "npu:0", "--model", "small", "--batch-sizes", "1,2", "--context-len", "24"]
    with npu_simulated_on_cpu(profile):
        code = main([*arguments, "--steps", "1", "--repeats", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "captured 2 decode graphs (full, npu:0)" in out
    for batch in (1, 2):
        assert re.search(rf"^\s+{batch}\s+[\d.]+\s+[\d.]+\s+[\d.]+x\s+0\s*$", out, re.MULTILINE), out
