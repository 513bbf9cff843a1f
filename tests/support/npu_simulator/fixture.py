"""pytest fixtures that run graphhal's npu device and reference model on the CPU SIMULATOR of torch_npu.

    from support.npu_simulator.fixture import npu_simulator, simulated_npu  # noqa: F401 (fixtures)

    def test_x(simulated_npu):            # a hal.Device("npu") backed by the simulator
        ...

Besides installing the simulator, they point the two seams that say where npu tensors live at the CPU:
the npu plugin's ``devices.npu.placement`` and the reference model's ``refmodel.npu_decode_attention``. On the way
out everything is restored, and the process-wide registry is reloaded so that no Device facade built
against the simulator outlives it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import pytest
import torch

import hal
from devices.npu import placement
from refmodel import npu_decode_attention
from support.npu_simulator.namespace import SIMULATED_TORCH_NPU_VERSION, installed
from support.npu_simulator.state import SimulatorState


@contextmanager
def npu_simulated_on_cpu(version: str = SIMULATED_TORCH_NPU_VERSION, device_count: int = 1) -> Iterator[SimulatorState]:
    """The simulator installed, with graphhal's npu tensors placed on the CPU, for the duration of the block."""
    try:
        with installed(version, device_count) as simulator, placement.tensors_on(
            lambda index: torch.device("cpu")
        ), npu_decode_attention.npu_tensors_on("cpu"):
            yield simulator
    finally:
        hal.reload_plugins()


@pytest.fixture
def npu_simulator() -> Iterator[SimulatorState]:
    """The simulator's state (launch log, cache flushes) while graphhal's npu device runs on it."""
    with npu_simulated_on_cpu() as simulator:
        yield simulator


@pytest.fixture
def simulated_npu(npu_simulator: SimulatorState) -> hal.Device:
    """A fresh ``hal.Device`` for "npu", served by the npu plugin on the simulator."""
    return hal.DeviceRegistry(load_entry_points=False).get_device("npu")
