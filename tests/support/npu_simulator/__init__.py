"""A CPU SIMULATOR of torch_npu's graph API, one profile per torch_npu release line, for tests: there is no
Ascend hardware here, and nothing in this package claims how hardware behaves beyond what torch_npu's source
says (each module names the file, line and tag it follows).

    with installed(PROFILES_BY_NAME["7.3"]) as simulator:   # sys.modules["torch_npu"], torch.npu: the simulator's
        ...                                                # run code written for torch_npu; tensors stay on the CPU
        simulator.launches                                 # which host lengths each simulated attention launch ran with

It installs a stand-in ``torch_npu`` module and ``torch.npu`` namespace for one release line (``profiles``:
7.1, 7.2 and 7.2's PyTorch 2.6 cut, 7.3, 26.0+): NPUGraph capture records the work issued and replays it with
host values baked in; task groups and updates re-issue a recorded launch with new host arguments; streams and
events order as documented; torch_npu's own capture dispatch mode and ``NPUGraph.update`` behave as that line's
source does, weak records and unprotected exits included. Where real hardware would silently misbehave or
hang, it raises instead (``errors``): a gated task replayed without its update, a replay reading lengths no
update ordered before it, an update racing a replay that may still read the old lengths, a tensor read on the
host during capture, a host-length launch hidden inside another op's kernel, an updatable launch without a
workspace, an update through a record whose tensor was freed.

``fixture`` holds the pytest fixtures (parametrized over every profile) that also point graphhal's npu device
and reference model at it. Nothing here is torch_npu; every module, error and object says "simulator".
"""

from support.npu_simulator.errors import (
    DanglingRecordError,
    HiddenLaunchError,
    HostReadDuringCaptureError,
    MissingWorkspaceError,
    NotSimulatedError,
    SimulatedHangError,
    SimulatorError,
    StaleHostValuesError,
    UpdateRaceError,
)
from support.npu_simulator.namespace import installed
from support.npu_simulator.profiles import NEWEST, PROFILES, PROFILES_BY_NAME, TorchNpuProfile
from support.npu_simulator.state import FAULTS, Launch, SimulatorState

__all__ = [
    "FAULTS",
    "NEWEST",
    "PROFILES",
    "PROFILES_BY_NAME",
    "DanglingRecordError",
    "HiddenLaunchError",
    "HostReadDuringCaptureError",
    "Launch",
    "MissingWorkspaceError",
    "NotSimulatedError",
    "SimulatedHangError",
    "SimulatorError",
    "SimulatorState",
    "StaleHostValuesError",
    "TorchNpuProfile",
    "UpdateRaceError",
    "installed",
]
