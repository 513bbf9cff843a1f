"""A runner counts what it does (``runner.stats()``), and a step without graphs is never silent."""

from __future__ import annotations

import logging

import pytest
import torch

import hal
from runners import DecodeConfig, DecodeRunner, InputSlot
from runners.step_counters import REFUSED
from support.dispatch_mode_flags import restored_dispatch_mode_flags  # noqa: F401 (a fixture)

SLOTS = [InputSlot("x", torch.float32, (4,))]


def step(*, x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x * 2.0)


def runner_on(device: str, **config) -> DecodeRunner:
    return DecodeRunner(step, SLOTS, device, DecodeConfig(show_progress=False, **config))


def rows(n: int, device: str) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(n, 4, device=hal.get_device(device).torch_device)}


def test_replays_are_counted_per_bucket_with_live_and_padded_rows(graph_device):
    runner = runner_on(graph_device, max_bs=8)
    runner.capture()
    for n in (3, 3, 8, 1):
        runner.run(rows(n, graph_device))
    stats = runner.stats()
    assert stats["replays"] == {8: 1, 4: 2, 1: 1}
    assert (stats["live_rows"], stats["padded_rows"]) == (15, 2)  # 3 -> bucket 4, twice
    assert stats["padding_fraction"] == pytest.approx(2 / 17)
    assert stats["eager"] == {}
    assert stats["address_checks"] == 4 and stats["address_check_seconds"] > 0
    assert stats["captured"] == 4 and set(stats["capture_seconds_by_bucket"]) == {8, 4, 2, 1}
    assert stats["mode"] == "full" and stats["requested_mode"] == "auto"
    assert stats["device_bytes"] is not None and stats["device_bytes"] >= stats["pool_bytes"] > 0


def test_eager_runs_are_counted_by_reason_and_logged_once(graph_device, caplog):
    runner = runner_on(graph_device, max_bs=4)
    runner.capture()
    with caplog.at_level(logging.WARNING, logger="runners.step_counters"):
        runner.run(rows(6, graph_device))
        runner.run(rows(9, graph_device))
    assert runner.stats()["eager"] == {"batch larger than the graphs hold": 2}
    warnings = [r for r in caplog.records if "ran without graphs" in r.getMessage()]
    assert len(warnings) == 1 and "batch larger than the graphs hold" in warnings[0].getMessage()


def test_a_refused_batch_is_counted_and_logged(graph_device, caplog):
    runner = runner_on(graph_device, max_bs=4, eager_fallback=False)
    runner.capture()
    with caplog.at_level(logging.WARNING, logger="runners.step_counters"), pytest.raises(ValueError, match="eager fallback is off"):
        runner.run(rows(6, graph_device))
    assert runner.stats()["eager"] == {REFUSED: 1}
    assert any(REFUSED in r.getMessage() for r in caplog.records)


def test_mode_disabled_counts_its_eager_runs_and_says_so_at_info(caplog):
    runner = runner_on("cpu", max_bs=4, mode="disabled")
    runner.capture()
    with caplog.at_level(logging.INFO, logger="runners.step_counters"):
        runner.run(rows(2, "cpu"))
    assert runner.stats()["eager"] == {"mode disabled": 1}
    assert [r.levelno for r in caplog.records if "ran without graphs" in r.getMessage()] == [logging.INFO]


def test_counting_off_counts_nothing_but_eager_runs_are_still_logged(caplog):
    runner = runner_on("cpu", max_bs=4)
    runner.capture()
    runner.counting = False
    with caplog.at_level(logging.WARNING, logger="runners.step_counters"):
        runner.run(rows(2, "cpu"))
        runner.run(rows(6, "cpu"))
    stats = runner.stats()
    assert (stats["counting"], stats["replays"], stats["eager"]) == (False, {}, {})
    assert any("ran without graphs" in r.getMessage() for r in caplog.records)


def test_log_stats_logs_one_line_and_returns_the_dict(caplog):
    runner = runner_on("cpu", max_bs=2)
    runner.capture()
    runner.run(rows(1, "cpu"))
    with caplog.at_level(logging.INFO, logger="runners.step_counters"):
        stats = runner.log_stats()
    assert stats["replays"] == {1: 1}
    assert any(r.getMessage().startswith("graphhal decode stats: {") for r in caplog.records)


def _double(x: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(x * 2)


_NEVER_OP = torch.library.custom_op("graphhal_test::counters_never", mutates_args=("out",))(_double)
_NEVER_OP.register_fake(lambda x, out: None)
hal.declare_graph_support(torch.ops.graphhal_test.counters_never.default, hal.GraphSupport.NEVER)
hal.register_splitting_op(torch.ops.graphhal_test.counters_never.default)


def _step_with_never_op(*, x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    torch.ops.graphhal_test.counters_never(x + 1, out)
    return out - 1


def test_a_mode_auto_settles_below_full_is_a_warning_and_full_is_not(caplog, restored_dispatch_mode_flags):
    torch._dynamo.reset()
    downgraded = DecodeRunner(_step_with_never_op, SLOTS, "cpu", DecodeConfig(buckets=[1, 2], show_progress=False))
    plain = runner_on("cpu", buckets=[1, 2])
    with caplog.at_level(logging.INFO, logger="runners.capture_loop"):
        downgraded.capture()
        plain.capture()
    levels = {r.getMessage().split(":")[1].strip(): r.levelno for r in caplog.records if "chose" in r.getMessage()}
    assert downgraded.config.mode == "piecewise" and plain.config.mode == "full"
    assert sorted(levels.values()) == [logging.INFO, logging.WARNING]
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert "piecewise" in warning.getMessage()
    assert downgraded.stats()["mode"] == "piecewise" and "chose piecewise" in downgraded.stats()["mode_reason"]
