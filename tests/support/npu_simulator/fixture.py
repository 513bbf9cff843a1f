"""pytest fixtures that run graphhal's npu device and reference model on the CPU SIMULATOR of torch_npu,
once per simulated torch_npu release line.

    from support.npu_simulator.fixture import npu_simulator, simulated_npu  # noqa: F401 (fixtures)

    def test_x(simulated_npu):            # a hal.Device("npu") backed by the simulator; runs per profile
        ...

Besides installing the simulator, they point the two seams that say where npu tensors live at the CPU:
the npu plugin's ``devices.npu.placement`` and the reference model's ``graphhal.paged_attention.npu_decode_attention`` (whose
``is_npu_tensor`` the npu prefill kernel shares), and the plugin's preflight at the Ascend stack the simulator's
state describes (``devices.npu.ascend_stack``: driver version, CANN runtime and operator library symbols). On the way out everything is restored, and the process-wide
registry is reloaded so that no Device facade built against the simulator outlives it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import pytest
import torch

import hal
from devices.npu import ascend_stack, placement, runtime, stream_budget
from graphhal.paged_attention import npu_decode_attention
from support.npu_simulator.namespace import installed
from support.npu_simulator.profiles import NEWEST, PROFILES, TorchNpuProfile
from support.npu_simulator.state import SimulatorState

# One test per simulated torch_npu line; ids like "torch_npu-7.2-pt2.6".
PROFILE_PARAMS = [pytest.param(profile, id=f"torch_npu-{profile.name}") for profile in PROFILES]


@contextmanager
def npu_simulated_on_cpu(profile: TorchNpuProfile = NEWEST, device_count: int = 1) -> Iterator[SimulatorState]:
    """The simulator of ``profile`` installed, with graphhal's npu tensors placed on the CPU, for the block."""
    try:
        with installed(profile, device_count) as simulator, placement.tensors_on(
            lambda index: torch.device("cpu")
        ), npu_decode_attention.npu_tensors_on("cpu"), ascend_stack.probed_by(_simulated_stack(simulator)):
            yield simulator
    finally:
        runtime._runtime = None  # the plugin's cached torch_npu belongs to this installation
        stream_budget._alive.clear()  # as do its graphs, which hold no stream of the next one
        hal.reload_plugins()


def _simulated_stack(simulator: SimulatorState) -> ascend_stack.AscendStack:
    """The driver and CANN runtime the simulator stands for, as its state says (a test may change them)."""

    def runtime_has(symbol: str) -> bool | None:
        symbols = simulator.runtime_symbols
        return None if symbols is None else symbol in symbols

    def op_library_has(symbol: str) -> bool | None:
        symbols = simulator.op_api_symbols
        return None if symbols is None else symbol in symbols

    return ascend_stack.AscendStack(lambda: simulator.driver_version, runtime_has, op_library_has)


@pytest.fixture(params=PROFILE_PARAMS)
def npu_profile(request: pytest.FixtureRequest) -> TorchNpuProfile:
    """Each simulated torch_npu release line in turn."""
    return request.param


@pytest.fixture
def npu_simulator(npu_profile: TorchNpuProfile) -> Iterator[SimulatorState]:
    """The simulator's state (launch log, pools, faults) while graphhal's npu device runs on it."""
    with npu_simulated_on_cpu(npu_profile) as simulator:
        yield simulator


@pytest.fixture
def simulated_npu(npu_simulator: SimulatorState) -> hal.Device:
    """A fresh ``hal.Device`` for "npu", served by the npu plugin on the simulator."""
    return hal.DeviceRegistry(load_entry_points=False).get_device("npu")
