"""A step that does not block (``runner.submit``): outputs the caller keeps, an event, host copies, and a per-step
path that never makes the host wait for the device.

On CUDA the last point is checked by torch itself (``torch.cuda.set_sync_debug_mode("error")``); on the cpu
reference device, where the host and the device are one, by refusing every host read of memory the device
owns (the runner's input buffers and its graph pool) while a step is queued: on a GPU each would be a sync.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import pytest
import torch

import hal
from graphhal.paged_attention import PagedKVCache, decode_input_slots
from graphhal.refmodel import DecodeWorkload, LlamaDecoder, ModelConfig
from runners import DecodeConfig, DecodeRunner, InputSlot

MODES = ["full", "breakable", "piecewise", "disabled"]


class Reference:
    """The tiny reference model with a KV cache, its decode runner captured in ``mode``."""

    def __init__(self, device_name: str, mode: str) -> None:
        torch._dynamo.reset()
        self.device = hal.get_device(device_name)
        self.config = ModelConfig.tiny()
        self.model = LlamaDecoder(self.config, self.device.torch_device, torch.float32, seed=0)
        self.cache = PagedKVCache(self.config, 64, self.device.torch_device, torch.float32)
        self.step = self.model.decode_forward(self.cache)
        self.runner = DecodeRunner(
            self.step, decode_input_slots(self.config), self.device,
            DecodeConfig(mode=mode, buckets=[1, 2, 4], show_progress=False),
        )
        self.runner.capture()

    def batch(self, rows: int, seed: int) -> dict[str, torch.Tensor]:
        return DecodeWorkload(self.cache, rows, max_context_len=10, seed=seed).batch(rows)


@pytest.mark.parametrize("mode", MODES)
def test_a_submitted_steps_outputs_are_the_callers_and_survive_later_steps(graph_device, mode):
    reference = Reference(graph_device, mode)
    first = reference.batch(3, seed=1)
    with torch.no_grad():
        expected = reference.step(**first).clone()
    handle = reference.runner.submit(first)
    later = reference.runner.run(reference.batch(4, seed=2))  # a larger bucket's replay over the same pool
    view = reference.runner.run(reference.batch(3, seed=3))  # and the very bucket the handle's step replayed
    torch.testing.assert_close(handle.wait(), expected)  # a run's views were overwritten; the handle's are not
    assert handle.outputs.data_ptr() not in (later.data_ptr(), view.data_ptr())
    assert handle.done()


def test_submit_keeps_only_the_outputs_asked_for(graph_device):
    device = hal.get_device(graph_device)
    runner = DecodeRunner(
        lambda x: {"tokens": x.argmax(-1), "logits": x * 2}, [InputSlot("x", torch.float32, (8,))], device,
        DecodeConfig(mode="full", buckets=[2, 4], show_progress=False),
    )
    runner.capture()
    x = torch.randn(3, 8, device=device.torch_device)
    handle = runner.submit({"x": x}, keep=["tokens"])
    assert set(handle.wait()) == {"tokens"} and torch.equal(handle.outputs["tokens"], x.argmax(-1))
    with pytest.raises(ValueError, match=r"submit\(keep=\['probs'\]\) names outputs the forward does not return; it returns \['logits', 'tokens'\]"):
        runner.submit({"x": x}, keep=["probs"])
    torch.testing.assert_close(runner.run({"x": x})["logits"], x * 2)  # the runner goes on
    with pytest.raises(TypeError, match="takes a list of output names"):
        runner.submit({"x": x}, keep="tokens")


def test_a_keep_naming_no_output_is_refused_before_the_step_runs(graph_device):
    # Once the runner knows what its forward returns, a wrong keep must not first run the step (writing a KV
    # cache, overwriting the pool) and only then fail.
    device = hal.get_device(graph_device)
    calls = []

    def forward(x):
        calls.append(1)
        return {"tokens": x.argmax(-1), "logits": x * 2}

    runner = DecodeRunner(forward, [InputSlot("x", torch.float32, (8,))], device, DecodeConfig(mode="disabled", max_bs=4, show_progress=False))
    x = torch.randn(3, 8, device=device.torch_device)
    runner.submit({"x": x}, keep=["tokens"]).wait()
    ran = len(calls)
    with pytest.raises(ValueError, match="names outputs the forward does not return"):
        runner.submit({"x": x}, keep=["probs"])
    assert len(calls) == ran


def test_a_handles_outputs_reach_the_host_through_a_queued_copy(graph_device):
    reference = Reference(graph_device, "full")
    batch = reference.batch(2, seed=4)
    handle = reference.runner.submit(batch)
    copy = handle.to_host()
    host = copy.wait()
    assert host.device.type == "cpu" and copy.done()
    torch.testing.assert_close(host, handle.wait().cpu())


def test_step_n_feeds_step_n_plus_1_on_the_device(graph_device):
    # The overlapped server's pattern: the tokens step n chose are step n+1's input ids, never on the host.
    reference = Reference(graph_device, "full")
    batch = reference.batch(2, seed=5)
    handle = reference.runner.submit(batch)
    next_ids = handle.outputs.argmax(-1)  # queued after the step, on the device
    follow = dict(batch, input_ids=next_ids)
    with torch.no_grad():
        expected_ids = reference.step(**batch).argmax(-1)
        expected = reference.step(**dict(batch, input_ids=expected_ids))
    torch.testing.assert_close(reference.runner.submit(follow).wait(), expected)


# --- the per-step path never waits for the device ------------------------------------------------------------


_HOST_READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


class DeviceWork:
    """Marks where the device itself works (a replay): on the cpu device its kernels run on the host and may read
    their inputs there (the cpu attention reads its lengths), which on a GPU happens on the GPU."""

    depth = 0

    @classmethod
    def wrap(cls, function):
        def run(*args, **kwargs):
            cls.depth += 1
            try:
                return function(*args, **kwargs)
            finally:
                cls.depth -= 1

        return run


@contextmanager
def no_host_reads_of(owned: list[torch.Tensor]) -> Iterator[None]:
    """Raise on any host read (``item``, ``tolist``, ``numpy``, truth values) of memory in ``owned``'s storages
    (what the device owns) outside the device's own work: on a GPU each such read waits for the device's queue."""
    storages = {t.untyped_storage().data_ptr() for t in owned}

    def refuse_if_owned(tensor: torch.Tensor, how: str) -> None:
        if DeviceWork.depth == 0 and isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() in storages:
            raise AssertionError(f"the host read device memory ({how} of a {tuple(tensor.shape)} tensor)")

    # Patched methods rather than a dispatch mode: Dynamo runs a compiled forward eagerly under a dispatch
    # mode, so the piecewise forward would not be what runs.
    originals = {name: getattr(torch.Tensor, name) for name in _HOST_READS}

    def watched(name):
        def read(self, *args, **kwargs):
            refuse_if_owned(self, name)
            return originals[name](self, *args, **kwargs)

        return read

    for name in originals:
        setattr(torch.Tensor, name, watched(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@pytest.mark.cpu
@pytest.mark.parametrize("mode", ["full", "breakable", "piecewise"])
def test_a_queued_step_reads_nothing_the_device_owns_on_the_reference_device(mode):
    reference = Reference("cpu", mode)
    runner = reference.runner
    batch = reference.batch(3, seed=6)
    runner.run(batch)  # the first replay of the bucket (its one-time checks) behind us
    owned = [*runner.inputs.buffers.values(), *runner.graphs[4].outputs._leaves]
    for step in runner.graphs.values():
        step.captured.run = DeviceWork.wrap(step.captured.run)
    with no_host_reads_of(owned):
        handle = runner.submit(reference.batch(3, seed=7))
        handle.to_host()
    # The guard itself catches a read: what a careless server (an .item() on the logits) would do.
    with pytest.raises(AssertionError, match="the host read device memory"):
        with no_host_reads_of(owned):
            runner.run(batch)[0, 0].item()


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["full", "breakable", "piecewise"])
def test_a_queued_step_never_synchronizes_the_gpu(mode):
    reference = Reference("cuda:0", mode)
    runner = reference.runner
    batch = reference.batch(3, seed=6)
    runner.run(batch)
    torch.cuda.synchronize()
    # What an overlapping server passes: host inputs in page-locked memory, or device tensors.
    pinned = {name: t.cpu().pin_memory() if name != "input_ids" else t for name, t in reference.batch(3, seed=7).items()}
    torch.cuda.set_sync_debug_mode("error")
    try:
        handle = runner.submit(pinned)
        copy = handle.to_host()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with torch.no_grad():
        expected = reference.step(**{name: t.cuda() for name, t in pinned.items()})
    torch.testing.assert_close(copy.wait(), expected.cpu())
