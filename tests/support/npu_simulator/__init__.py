"""A CPU SIMULATOR of torch_npu's graph API (torch_npu 2.14 semantics), for tests: there is no Ascend hardware here.

    with installed() as simulator:           # sys.modules["torch_npu"] and torch.npu are the simulator's
        ...                                  # run code written for torch_npu; tensors stay on the CPU
        simulator.launches                   # which host lengths each simulated attention launch ran with

It installs a stand-in ``torch_npu`` module and ``torch.npu`` namespace whose NPUGraph capture records the work
issued and replays it with host values baked in; task groups and updates re-issue a recorded launch with new
host arguments; streams and events order as documented. Where real hardware would silently misbehave or hang,
it raises instead (``errors``): a gated task replayed without its update, a replay reading lengths no update
ordered before it, an update racing a replay that may still read the old lengths, a tensor read on the host
during capture, a host-length launch hidden inside another op's kernel.

``fixture`` holds the pytest fixtures that also point graphhal's npu device and reference model at it.
Nothing here is torch_npu; every module, error and object says "simulator".
"""

from support.npu_simulator.errors import (
    HiddenLaunchError,
    HostReadDuringCaptureError,
    NotSimulatedError,
    SimulatedHangError,
    SimulatorError,
    StaleHostValuesError,
    UpdateRaceError,
)
from support.npu_simulator.namespace import SIMULATED_TORCH_NPU_VERSION, installed
from support.npu_simulator.state import Launch, SimulatorState

__all__ = [
    "SIMULATED_TORCH_NPU_VERSION",
    "HiddenLaunchError",
    "HostReadDuringCaptureError",
    "Launch",
    "NotSimulatedError",
    "SimulatedHangError",
    "SimulatorError",
    "SimulatorState",
    "StaleHostValuesError",
    "UpdateRaceError",
    "installed",
]
