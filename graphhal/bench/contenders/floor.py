"""The floor: the same step captured by hand as a device graph, no graphhal in between.

On CUDA: static input tensors, a warm-up on a side stream, a ``torch.cuda.CUDAGraph`` captured in its own
pool, and per step the same input copy the runner does, then ``replay()``. Elsewhere the same idea through
the device's own graph (``Device.make_graph`` / ``capture_session`` / ``replayer``), with ``Device.update``
before every replay where the device bakes host values into its graphs (npu attention lengths): the batch's
lengths as host lists, made once, as a server that keeps its lengths on the host has them. Either way the
least any runner could cost on that device: every row's ``/ floor`` is its time over this one's.
"""

from __future__ import annotations

import time
from typing import Any

import torch

import hal
from graphhal.bench.contenders.contender import Batch, Contender, Prepared
from graphhal.bench.contenders.static_buffers import input_loader, static_copy
from graphhal.bench.names import FLOOR
from graphhal.bench.workload import Workload


class HandWrittenFloor(Contender[Batch]):
    name = FLOOR

    def __init__(self, device: hal.Device) -> None:
        self.on_cuda = device.torch_device.type == "cuda"
        self.detail = (
            "torch.cuda.CUDAGraph replayed directly, no graphhal"
            if self.on_cuda
            else f"the {device.type} device's own graph replayed through its plugin, no runner"
        )

    def skip_reason(self, device: hal.Device) -> str | None:
        if hal.GraphMode.FULL not in device.graph_modes:
            return f"device {device} has no full graphs to hand-write a floor with"
        return None

    def prepare(self, workload: Workload, batch: Batch) -> Prepared:
        return self._cuda(workload, batch) if self.on_cuda else self._device_graph(workload, batch)

    @staticmethod
    def _cuda(workload: Workload, batch: Batch) -> Prepared:
        step, torch_device = workload.decode_step, workload.device.torch_device
        started = time.perf_counter()
        static = static_copy(batch)
        # Warm up on a side stream, as torch.cuda.graphs asks: lazy init and Triton autotuning must not
        # happen inside the capture, and the side stream keeps the warm-up's allocations out of the pool.
        side = torch.cuda.Stream(torch_device)
        side.wait_stream(torch.cuda.current_stream(torch_device))
        with torch.cuda.stream(side):
            step(**static)
        torch.cuda.current_stream(torch_device).wait_stream(side)
        torch.cuda.synchronize(torch_device)
        pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs = step(**static)
        torch.cuda.synchronize(torch_device)
        setup_s = time.perf_counter() - started

        load = input_loader(static)

        def run() -> Any:
            load(batch)
            graph.replay()
            return outputs

        return Prepared(run=run, setup_s=setup_s, pool_bytes=workload.device.memory_stats(pool).pool_bytes)

    @staticmethod
    def _device_graph(workload: Workload, batch: Batch) -> Prepared:
        step, device = workload.decode_step, workload.device
        started = time.perf_counter()
        static = static_copy(batch)
        step(**static)
        device.synchronize()
        pool = device.graph_pool()
        graph = device.make_graph(hal.GraphMode.FULL)
        with device.capture_session(graph, pool):
            outputs = step(**static)
        replay = device.replayer(graph)
        device.synchronize()
        setup_s = time.perf_counter() - started

        load = input_loader(static)
        update = _host_lengths(workload, batch) if device.needs_graph_update else None

        def run() -> Any:
            load(batch)
            if update is not None:
                device.update(graph, update)
            replay()
            return outputs

        return Prepared(run=run, setup_s=setup_s, pool_bytes=device.memory_stats(pool).pool_bytes)


def _host_lengths(workload: Workload, batch: Batch) -> dict[str, list[int]]:
    """What ``Device.update`` takes for this batch: the values of every slot with an updated role (the lengths),
    as host lists. Read once: the batch is the same every step, and a server keeps its lengths on the host."""
    roles = (hal.SlotRole.SEQ_LENS, hal.SlotRole.QUERY_LENS)
    return {slot.role: batch[slot.name].tolist() for slot in workload.decode_slots if slot.role in roles}
