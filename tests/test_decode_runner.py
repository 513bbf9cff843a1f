"""DecodeRunner's contract with a small forward, on every device with full graphs (cpu, cuda).

The reference-model tests (test_decode_reference_model.py) cover a real decoder; these pin each rule.
"""

from __future__ import annotations

import gc

import pytest
import torch

import hal
from hal.capture_state import current_capture
from runners import DecodeConfig, DecodeRunner, InputSlot, default_decode_buckets
from runners.static_inputs import StaticInputs

SLOTS = [InputSlot("x", torch.float32, (4,)), InputSlot("pos", torch.int64, fill=0)]


class TinyStep:
    """Row-wise model step; remembers the batch sizes it ran at and whether the collector was frozen."""

    def __init__(self, device: torch.device) -> None:
        generator = torch.Generator().manual_seed(0)
        self.weight = torch.randn(4, 4, generator=generator).to(device)
        self.calls: list[tuple[int, bool]] = []  # (rows, inside a capture)
        self.gc_states: list[tuple[bool, bool]] = []  # (collector enabled, objects frozen)

    def __call__(self, *, x: torch.Tensor, pos: torch.Tensor) -> dict:
        self.calls.append((x.shape[0], current_capture() is not None))
        self.gc_states.append((gc.isenabled(), gc.get_freeze_count() > 0))
        hidden = torch.tanh(x @ self.weight) + pos.unsqueeze(-1).float()
        return {"hidden": hidden, "aux": (hidden.sum(-1), None)}


def make_batch(rows: int, device: torch.device, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(rows, 4, generator=generator).to(device),
        "pos": torch.randint(0, 100, (rows,), generator=generator).to(device),
    }


def assert_same(actual: dict, expected: dict) -> None:
    torch.testing.assert_close(actual["hidden"], expected["hidden"])
    torch.testing.assert_close(actual["aux"][0], expected["aux"][0])
    assert actual["aux"][1] is None


def make_runner(graph_device: str, step=None, **config) -> tuple[DecodeRunner, TinyStep]:
    device = hal.get_device(graph_device)
    step = step or TinyStep(device.torch_device)
    config.setdefault("show_progress", False)
    return DecodeRunner(step, SLOTS, device, DecodeConfig(**config)), step


# --- buckets and config -----------------------------------------------------------------------------------


def test_default_buckets_are_dense_small_then_step_8_capped_at_max_bs():
    assert default_decode_buckets(256) == [1, 2, 4, 8, 12, *range(16, 257, 8)]
    assert default_decode_buckets(20) == [1, 2, 4, 8, 12, 16, 20]
    assert default_decode_buckets(3) == [1, 2, 3]
    assert DecodeConfig().buckets == default_decode_buckets(256)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"buckets": [4, 2, 8]}, "strictly increasing"),
        ({"buckets": [0, 2]}, "positive"),
        ({"buckets": [1, 2, 4], "max_bs": 8}, r"largest bucket \(4\) must equal max_bs \(8\)"),
        ({"max_bs": 0}, "max_bs must be a positive integer"),
        ({"buckets": []}, "must not be empty"),
        ({"warmup_runs": 0}, "warmup_runs must be at least 1"),
    ],
)
def test_bad_config_is_rejected_with_the_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DecodeConfig(**kwargs)


# --- capture and run --------------------------------------------------------------------------------------


def test_every_bucket_equals_eager(graph_device):
    runner, step = make_runner(graph_device, max_bs=16)
    report = runner.capture()
    assert report.buckets == (16, 12, 8, 4, 2, 1)
    for rows in range(1, 17):
        batch = make_batch(rows, runner.device.torch_device, seed=rows)
        assert runner.can_run(batch)
        assert_same(runner.run(batch), step(**batch))


def test_capture_goes_largest_first_with_an_eager_warmup_before_each_capture_and_gc_frozen(graph_device):
    runner, step = make_runner(graph_device, max_bs=4, warmup_runs=2)
    frozen_before = gc.get_freeze_count()  # a library in this process may have frozen objects already
    runner.capture()
    # Mode auto's one eager run at the largest bucket (what do the ops of the largest batch allow?), then two
    # eager warm-ups and the capture per bucket, largest first.
    assert step.calls == [(4, False), (4, False), (4, False), (4, True), (2, False), (2, False), (2, True), (1, False), (1, False), (1, True)]
    assert set(step.gc_states[1:]) == {(False, True)}  # collector paused and survivors frozen throughout the loop
    assert gc.isenabled()
    if frozen_before == 0:
        assert gc.get_freeze_count() == 0  # what the loop froze is thawed again
    else:
        assert gc.get_freeze_count() >= frozen_before  # never thaw what someone else froze


def test_capture_keeps_what_the_server_froze_itself_frozen(graph_device, monkeypatch):
    # Watched through gc.unfreeze rather than gc.get_freeze_count: the count is process-wide, and other
    # threads of a long test process may freeze or thaw in between.
    runner, _ = make_runner(graph_device, max_bs=2)
    thawed = []
    real_unfreeze = gc.unfreeze
    monkeypatch.setattr(gc, "unfreeze", lambda: thawed.append(True))
    gc.freeze()
    try:
        runner.capture()
        assert thawed == []  # the server's frozen objects stayed frozen
    finally:
        real_unfreeze()


def test_padded_tail_is_refilled_on_every_run(graph_device):
    def step(*, x, pos):
        # Not row-wise on purpose: the sum over the whole bucket exposes what padded rows hold.
        return {"hidden": x + x.sum() + pos.sum(), "aux": (x[:, 0], None)}

    device = hal.get_device(graph_device)
    runner = DecodeRunner(step, SLOTS, device, DecodeConfig(buckets=[4], show_progress=False))
    runner.capture()
    runner.run(make_batch(4, device.torch_device, seed=5))  # fills all four rows with live data
    batch = make_batch(2, device.torch_device, seed=6)
    out = runner.run(batch)
    # Rows 2 and 3 must hold the fill (x=0, pos=0), not the previous batch's rows.
    torch.testing.assert_close(out["hidden"], batch["x"] + batch["x"].sum() + batch["pos"].sum())
    assert torch.equal(runner.inputs.rows.buffers["x"][2:], torch.zeros(2, 4, device=device.torch_device))


def test_static_inputs_copy_live_rows_and_refill_padding_per_dtype_and_fill(graph_device):
    # The copies are grouped (one _foreach_copy_ per dtype, one refill per dtype and fill): every slot must still
    # get its own rows and its own fill, whatever the sources are (device, host, strided) and at every size.
    device = torch.device(graph_device)
    slots = [
        InputSlot("ids", torch.int64, fill=-1),
        InputSlot("tables", torch.int32, row_shape=(3,), fill=7),
        InputSlot("pos", torch.int64, fill=0),
        InputSlot("lens", torch.int32, fill=0),
        InputSlot("scale", torch.bfloat16, fill=-3.5),
    ]
    inputs = StaticInputs(slots, 8, device)
    for buffer in inputs.buffers.values():
        buffer.fill_(9)  # what an earlier, larger batch left
    live = {
        "ids": torch.arange(3, device=device),
        "tables": torch.arange(18, dtype=torch.int32).reshape(3, 6)[:, ::2],  # strided, on the host
        "pos": torch.arange(3, device=device) + 5,
        "lens": torch.tensor([4, 5, 6], dtype=torch.int32),  # on the host
        "scale": torch.ones(3, dtype=torch.bfloat16, device=device),
    }
    for rows, bucket in ((3, 6), (3, 3), (0, 2), (3, 6)):  # the last one from the kept views
        inputs.load({name: tensor[:rows] for name, tensor in live.items()}, rows, bucket)
        for slot in slots:
            buffer = inputs.buffers[slot.name].cpu()
            torch.testing.assert_close(buffer[:rows], live[slot.name][:rows].cpu(), rtol=0, atol=0)
            assert (buffer[rows:bucket] == slot.fill).all(), f"{slot.name} padded rows {rows}:{bucket}"
            assert (buffer[max(bucket, 6):] == 9).all(), f"{slot.name} wrote past bucket {bucket}"


def test_outputs_are_views_into_graph_memory_overwritten_by_the_next_run(graph_device):
    runner, step = make_runner(graph_device, max_bs=4)
    runner.capture()
    first = runner.run(make_batch(3, runner.device.torch_device, seed=1))["hidden"]
    second_batch = make_batch(3, runner.device.torch_device, seed=2)
    runner.run(second_batch)
    torch.testing.assert_close(first, step(**second_batch)["hidden"])


def test_batch_over_max_bs_runs_eagerly_or_raises_without_fallback(graph_device):
    runner, step = make_runner(graph_device, max_bs=4)
    runner.capture()
    big = make_batch(9, runner.device.torch_device)
    assert not runner.can_run(big) and not runner.can_run(9)
    assert_same(runner.run(big), step(**big))

    strict, _ = make_runner(graph_device, max_bs=4, eager_fallback=False)
    strict.capture()
    with pytest.raises(ValueError, match=r"9 rows exceeds max_bs 4 and eager fallback is off"):
        strict.run(big)


def test_disabled_mode_runs_eagerly_through_the_same_api(graph_device):
    runner, step = make_runner(graph_device, mode="disabled", max_bs=4)
    report = runner.capture()
    assert report.buckets == () and "runs eagerly" in report.summary()
    batch = make_batch(3, runner.device.torch_device)
    assert not runner.can_run(batch)
    assert_same(runner.run(batch), step(**batch))


def test_capture_report_names_buckets_time_and_pool(graph_device):
    runner, _ = make_runner(graph_device, max_bs=8)
    summary = runner.capture().summary()
    assert summary.startswith(f"graphhal: captured 4 decode graphs (full, {graph_device}) for sizes 8..1 in ")
    assert " MiB (bucket 8 " in summary and " MiB more); device-wide " in summary and summary.endswith(" MiB")


def test_run_before_capture_is_an_error(graph_device):
    runner, _ = make_runner(graph_device, max_bs=2)
    with pytest.raises(RuntimeError, match=r"call capture\(\) before run\(\)"):
        runner.run(make_batch(1, runner.device.torch_device))


# --- bad input --------------------------------------------------------------------------------------------


@pytest.mark.cpu
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b.pop("pos"), r"missing: pos"),
        (lambda b: b.update(extra=torch.zeros(2)), r"unexpected: extra"),
        (lambda b: b.update(pos=b["pos"].int()), r"input slot 'pos': dtype torch.int32, expected torch.int64"),
        (lambda b: b.update(x=torch.zeros(2, 5)), r"input slot 'x': shape \(2, 5\), expected \(rows, 4\)"),
        (lambda b: b.update(x=torch.zeros(2, 4, device="meta")), r"input slot 'x': tensor is on meta, expected cpu"),
        (lambda b: b.update(pos=torch.zeros(3, dtype=torch.int64)), r"'pos' has 3 rows but 'x' has 2"),
        (lambda b: b.update(x=[[0.0] * 4] * 2), r"input slot 'x': expected a tensor, got list"),
    ],
)
def test_bad_batches_name_the_slot(change, message):
    runner, _ = make_runner("cpu", max_bs=4)
    runner.capture()
    batch = make_batch(2, torch.device("cpu"))
    change(batch)
    with pytest.raises(ValueError, match=message):
        runner.run(batch)


def test_a_failing_forward_during_capture_names_bucket_mode_and_device_and_leaves_the_device_usable(graph_device):
    device = hal.get_device(graph_device)
    healthy = TinyStep(device.torch_device)

    class FailsWhenCapturingBucket2(TinyStep):
        def __call__(self, *, x, pos):
            self.calls.append((x.shape[0], current_capture() is not None))
            if (2, True) in self.calls:  # bucket 2's warm-up passes, its capture fails
                raise RuntimeError("kernel launch failed")
            return healthy(x=x, pos=pos)

    runner = DecodeRunner(
        FailsWhenCapturingBucket2(device.torch_device), SLOTS, device, DecodeConfig(max_bs=4, show_progress=False)
    )
    with pytest.raises(hal.CaptureError, match=rf"bucket 2 \(mode full\) on {graph_device} failed: RuntimeError: kernel launch failed") as info:
        runner.capture()
    assert (info.value.bucket, info.value.mode, info.value.device) == (2, "full", graph_device)
    assert not runner.captured and not runner.can_run(1)  # bucket 4's graph was dropped too

    # The device still runs eagerly and captures again.
    batch = make_batch(3, device.torch_device)
    expected = healthy(**batch)
    again, _ = make_runner(graph_device, step=healthy, max_bs=4)
    again.capture()
    assert_same(again.run(batch), expected)


def test_the_same_runner_captures_again_after_a_failed_capture(graph_device):
    device = hal.get_device(graph_device)
    healthy = TinyStep(device.torch_device)
    failures = {"left": 1}

    def flaky(*, x, pos):
        if current_capture() is not None and x.shape[0] == 2 and failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("transient launch failure")
        return healthy(x=x, pos=pos)

    runner, _ = make_runner(graph_device, step=flaky, max_bs=4)
    with pytest.raises(hal.CaptureError, match="transient launch failure"):
        runner.capture()
    runner.capture()  # into a new pool: the old one may have been released with its last graph
    batch = make_batch(3, device.torch_device)
    assert_same(runner.run(batch), healthy(**batch))


def test_a_failing_warmup_is_reported_as_a_model_error(graph_device):
    def step(*, x, pos):
        raise IndexError("token id out of range")

    runner, _ = make_runner(graph_device, step=step, max_bs=2, mode="breakable")
    with pytest.raises(hal.CaptureError, match=r"eager warm-up .* bucket 2 .*before any capture.*IndexError"):
        runner.capture()
    # Mode auto (and full) runs the forward once at the largest bucket before anything else.
    runner, _ = make_runner(graph_device, step=step, max_bs=2)
    with pytest.raises(hal.CaptureError, match=r"eager run .* bucket 2 .*mode auto.*before any capture.*IndexError"):
        runner.capture()
    assert not runner.captured


def test_a_host_sync_inside_the_forward_fails_capture_cleanly(graph_device):
    device = hal.get_device(graph_device)
    healthy = TinyStep(device.torch_device)

    def syncs(*, x, pos):
        if x.sum().item() > float("inf"):  # reading a device value on the host: illegal in a capture
            pass
        return healthy(x=x, pos=pos)

    runner = DecodeRunner(syncs, SLOTS, device, DecodeConfig(max_bs=2, show_progress=False))
    with pytest.raises(hal.CaptureError, match=rf"bucket 2 \(mode full\) on {graph_device} failed"):
        runner.capture()
    again, _ = make_runner(graph_device, step=healthy, max_bs=2)
    again.capture()
    batch = make_batch(2, device.torch_device)
    assert_same(again.run(batch), healthy(**batch))


def test_outputs_without_a_batch_dimension_are_rejected_at_capture(graph_device):
    def step(*, x, pos):
        return {"hidden": x, "total": x.sum()}

    runner, _ = make_runner(graph_device, step=step, max_bs=2)
    with pytest.raises(hal.CaptureError, match=r"output\['total'\] has shape \(\); every output tensor needs the batch"):
        runner.capture()


def test_a_watched_tensor_moved_after_capture_is_caught_on_first_replay(graph_device):
    device = hal.get_device(graph_device)
    step = TinyStep(device.torch_device)
    runner = DecodeRunner(
        step, SLOTS, device, DecodeConfig(max_bs=2, show_progress=False), watched_tensors={"weight": step.weight}
    )
    runner.capture()
    runner.run(make_batch(2, device.torch_device))  # bucket 2 checked and fine
    step.weight.data = torch.randn(4, 4, device=device.torch_device)  # e.g. a weight reload done wrong
    with pytest.raises(hal.StaticAddressError, match=r"watched tensor 'weight' moved since the decode graph for bucket 1"):
        runner.run(make_batch(1, device.torch_device))
