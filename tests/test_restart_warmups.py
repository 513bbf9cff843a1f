"""What a fresh process pays once before its first capture: Triton's cache key hashed in the background, and
no garbage collection in a capture."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

import hal
from devices.cuda import triton_key_warmup
from graphhal.refmodel import ModelConfig
from runners import DecodeConfig, DecodeRunner

pytestmark = pytest.mark.cpu


def _module_with_triton_key():
    """Where Triton keeps ``triton_key``: triton.runtime.cache (Triton 3.5), triton.compiler.compiler (3.2)."""
    pytest.importorskip("triton")
    import triton.compiler.compiler
    import triton.runtime.cache

    return next(module for module in (triton.runtime.cache, triton.compiler.compiler) if hasattr(module, "triton_key"))


def test_triton_key_is_hashed_once_on_a_background_thread(monkeypatch):
    calls = []
    monkeypatch.setattr(triton_key_warmup, "_started", False)
    monkeypatch.setattr(_module_with_triton_key(), "triton_key", lambda: calls.append(threading.current_thread().name))
    triton_key_warmup.start_hashing_triton_key()
    triton_key_warmup.start_hashing_triton_key()  # the device made twice, or a second GPU: once per process
    for thread in threading.enumerate():
        if thread.name == "graphhal-triton-key":
            thread.join(timeout=30)
    assert calls == ["graphhal-triton-key"]


def test_a_capture_runs_no_garbage_collection_and_keeps_the_collector_paused(monkeypatch):
    from graphhal.bench.workload import build_reference_workload

    device = hal.get_device("cpu")
    workload = build_reference_workload(device, ModelConfig.tiny(), torch.float32, max_batch_size=4, context_len=16)
    collections, seen = [], []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *args: collections.append(args) or real_collect(*args))

    def forward(**inputs):
        seen.append((gc.isenabled(), gc.get_freeze_count() > 0))
        return workload.decode_step(**inputs)

    config = DecodeConfig(mode="full", buckets=[1, 2, 4], show_progress=False)
    runner = DecodeRunner(forward, workload.decode_slots, device, config)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    with torch.inference_mode():
        report = runner.capture()
    assert report.buckets == (4, 2, 1)
    assert collections == []  # a full collection of a server's heap is a tenth of a second: none is paid
    # mode full's eager run, then every bucket's warm-up and capture: the collector paused, the heap frozen
    assert len(seen) >= 1 + 2 * 3 and set(seen) == {(False, True)}
    assert gc.isenabled() and gc.get_freeze_count() == 0  # given back as found
