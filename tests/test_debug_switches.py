"""Each debug switch catches a planted bug that passes silently without it; all are off by default."""

from __future__ import annotations

import logging

import pytest
import torch

from graphhal.paged_attention import PagedKVCache, decode_input_slots
from graphhal.refmodel import LlamaDecoder, ModelConfig, PrefillWorkload
from runners import DecodeConfig, DecodeRunner, InputSlot, PrefillConfig, PrefillRunner
from runners.debug_switches import POISON_OUTPUTS_ENV, VERIFY_CAPTURE_ENV, GraphVerifyError

pytestmark = pytest.mark.cpu
SLOTS = [InputSlot("x", torch.float32, (4,)), InputSlot("lens", torch.int32, fill=0)]


def host_planned_step(*, x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Planted bug: metadata prepared on the host from the batch (as a kernel's plan step would), outside
    torch's ops; a graph keeps the capture's, eager recomputes it (flashinfer 1968)."""
    plan = torch.from_numpy(lens.numpy().astype("float32") + 1.0)
    return x * plan.unsqueeze(-1)


def batch(rows: int, lens: int = 1) -> dict[str, torch.Tensor]:
    return {"x": torch.ones(rows, 4), "lens": torch.full((rows,), lens, dtype=torch.int32)}


def test_every_switch_is_off_by_default(monkeypatch):
    monkeypatch.delenv(VERIFY_CAPTURE_ENV, raising=False)
    monkeypatch.delenv(POISON_OUTPUTS_ENV, raising=False)
    runner = DecodeRunner(host_planned_step, SLOTS, "cpu", DecodeConfig(max_bs=2, show_progress=False))
    assert (runner.debug.verify_capture, runner.debug.poison_outputs) == (False, False)


# --- verify on capture -------------------------------------------------------------------------------------


def test_without_verification_stale_host_metadata_captures_silently_and_replays_wrong(monkeypatch):
    monkeypatch.delenv(VERIFY_CAPTURE_ENV, raising=False)
    runner = DecodeRunner(host_planned_step, SLOTS, "cpu", DecodeConfig(max_bs=4, show_progress=False))
    runner.capture()  # nothing says anything
    replayed = runner.run(batch(3, lens=1)).clone()
    assert not torch.equal(replayed, host_planned_step(**batch(3, lens=1)))  # 1.0 baked in, 2.0 is right


def test_verification_fails_the_capture_naming_the_bucket_and_the_largest_difference(monkeypatch):
    monkeypatch.setenv(VERIFY_CAPTURE_ENV, "1")
    runner = DecodeRunner(host_planned_step, SLOTS, "cpu", DecodeConfig(max_bs=4, show_progress=False))
    with pytest.raises(GraphVerifyError, match=r"decode bucket 4 \(mode full\) on cpu replays to different numbers .*largest difference [0-9.]+ in output\.") as info:
        runner.capture()
    assert info.value.bucket == 4
    assert not runner.captured and not runner.graphs  # closed: nothing wrong is left to replay


def test_verification_passes_the_reference_model_in_both_phases(monkeypatch):
    monkeypatch.setenv(VERIFY_CAPTURE_ENV, "1")
    config = ModelConfig.tiny()
    model = LlamaDecoder(config, "cpu", torch.float32)
    kv_cache = PagedKVCache(config, num_blocks=32, device="cpu", dtype=torch.float32)
    workload = PrefillWorkload(kv_cache, [3, 2])
    decode = DecodeRunner(model.decode_forward(kv_cache), decode_input_slots(config), "cpu", DecodeConfig(max_bs=8, show_progress=False))
    prefill = PrefillRunner(
        model.prefill_forward(kv_cache), workload.token_slots(), workload.request_slots(), "cpu",
        PrefillConfig(max_tokens=16, max_requests=3, show_progress=False),
    )
    with torch.inference_mode():
        decode.capture()
        prefill.capture()
    assert decode.captured and prefill.captured


# --- poison stale outputs ----------------------------------------------------------------------------------


def double(*, x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    return x * 2 + lens.unsqueeze(-1)


def held_view_after_next_step(monkeypatch, poison: bool) -> torch.Tensor:
    """Planted bug: a consumer keeps step 1's output view and reads it after step 2 ran (vLLM PR 53520)."""
    if poison:
        monkeypatch.setenv(POISON_OUTPUTS_ENV, "1")
    else:
        monkeypatch.delenv(POISON_OUTPUTS_ENV, raising=False)
    runner = DecodeRunner(double, SLOTS, "cpu", DecodeConfig(max_bs=4, show_progress=False))
    runner.capture()
    kept = runner.run(batch(4, lens=1))
    fresh = runner.run(batch(1, lens=5))
    assert torch.equal(fresh, double(**batch(1, lens=5)))  # the live step's outputs are right either way
    return kept


def test_without_poison_a_stale_view_reads_numbers_that_look_fine(monkeypatch):
    kept = held_view_after_next_step(monkeypatch, poison=False)
    assert torch.isfinite(kept).all()  # step 1's rows beside step 2's: silently wrong


def test_poison_makes_a_stale_view_read_nan(monkeypatch):
    kept = held_view_after_next_step(monkeypatch, poison=True)
    assert torch.isnan(kept).any()


def test_poison_fills_integer_outputs_with_the_smallest_integer(monkeypatch):
    monkeypatch.setenv(POISON_OUTPUTS_ENV, "1")
    runner = DecodeRunner(lambda *, x, lens: {"ids": lens.long() + 1, "x": x}, SLOTS, "cpu", DecodeConfig(max_bs=4, show_progress=False))
    runner.capture()
    kept = runner.run(batch(4))["ids"]
    runner.run(batch(1))
    assert (kept[1:] == torch.iinfo(torch.int64).min).all()


def test_poison_leaves_a_batch_fed_from_the_last_outputs_intact(monkeypatch):
    """The copy in comes before the poison: a server may pass step n's outputs as step n+1's inputs."""
    monkeypatch.setenv(POISON_OUTPUTS_ENV, "1")
    runner = DecodeRunner(lambda *, x, lens: x + 1, SLOTS, "cpu", DecodeConfig(max_bs=4, show_progress=False))
    runner.capture()
    first = runner.run(batch(2))
    second = runner.run({"x": first, "lens": torch.zeros(2, dtype=torch.int32)})
    assert torch.equal(second, torch.full((2, 4), 3.0))


# --- host values baked into a graph (cpu) ------------------------------------------------------------------


class TemperatureStep:
    """Planted bug: a sampling temperature as a Python float the server changes between steps."""

    temperature = 0.5

    def __call__(self, *, x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        return x / self.temperature


def test_without_the_report_a_baked_temperature_captures_silently_and_replays_stale(monkeypatch, caplog):
    monkeypatch.delenv("GRAPHHAL_REPORT_BAKED_VALUES", raising=False)
    step = TemperatureStep()
    runner = DecodeRunner(step, SLOTS, "cpu", DecodeConfig(max_bs=2, show_progress=False))
    with caplog.at_level(logging.WARNING):
        runner.capture()
    assert not [r for r in caplog.records if "baked" in r.getMessage()]
    step.temperature = 1.0
    assert torch.equal(runner.run(batch(2)), torch.full((2, 4), 2.0))  # still divided by 0.5


def test_the_report_names_the_baked_value_its_op_and_the_line_it_came_from(monkeypatch, caplog):
    monkeypatch.setenv("GRAPHHAL_REPORT_BAKED_VALUES", "1")
    runner = DecodeRunner(TemperatureStep(), SLOTS, "cpu", DecodeConfig(max_bs=2, show_progress=False))
    with caplog.at_level(logging.WARNING, logger="devices.cpu.baked_values"):
        runner.capture()
    baked = runner.graphs[2].graph.raw.baked_values
    assert [(v.op, v.argument, v.value) for v in baked] == [("aten.div.Tensor", "other", 0.5)]
    assert "test_debug_switches.py" in baked[0].source and "(__call__)" in baked[0].source
    messages = [r.getMessage() for r in caplog.records]
    assert any("aten.div.Tensor(other=0.5) from" in m and "test_debug_switches.py" in m for m in messages)


# --- on every rank -----------------------------------------------------------------------------------------


def _verify_on_two_ranks(rank: int, world_size: int) -> str:
    """Rank 1 runs the planted bug, rank 0 a correct step: the capture fails on both, naming rank 1's bucket."""
    import os

    import torch.distributed as dist

    os.environ[VERIFY_CAPTURE_ENV] = "1"
    step = host_planned_step if rank == 1 else double
    runner = DecodeRunner(step, SLOTS, "cpu", DecodeConfig(max_bs=2, show_progress=False), group=dist.group.WORLD)
    try:
        runner.capture()
    except Exception as error:  # noqa: BLE001 (each rank reports what it raised)
        return f"{type(error).__name__}: {error}"
    return "captured"


def test_verification_fails_the_capture_on_every_rank():
    from support.spawn_ranks import run_on_ranks

    rank0, rank1 = run_on_ranks(_verify_on_two_ranks, timeout_s=120)
    for message in (rank0, rank1):
        assert message.startswith("RankCaptureError") and "verification of bucket 2" in message, message
        assert "rank 1 failed" in message and "largest difference" in message, message
