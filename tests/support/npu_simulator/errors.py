"""What the SIMULATOR of torch_npu reports when the code under test would misbehave on an Ascend NPU.

Each error is something real hardware does silently or by hanging; the simulator makes it loud.
"""

from __future__ import annotations


class SimulatorError(RuntimeError):
    """Base of every error the npu simulator raises (messages start with "npu simulator:")."""

    def __init__(self, message: str) -> None:
        super().__init__(f"npu simulator: {message}")


class SimulatedHangError(SimulatorError):
    """A replayed task waits on an ExternalEvent nobody recorded: on hardware the replay would hang forever."""


class StaleHostValuesError(SimulatorError):
    """A replay reads host values (lengths) that no update ordered before it: on hardware it would read the
    values baked at capture, or a previous step's."""


class UpdateRaceError(SimulatorError):
    """An update rewrites a captured task while a replay that reads it may still be unfinished: on hardware
    that replay reads the new step's values (and consumes its event)."""


class HostReadDuringCaptureError(SimulatorError):
    """A tensor's values were read on the host while an NPU graph was being captured (the stream only records:
    there are no values yet, and a host sync would invalidate the capture)."""


class HiddenLaunchError(SimulatorError):
    """A host-argument op was launched inside another op's kernel during capture: no dispatch mode saw it, so
    its host values are baked in and can never be updated."""


class NotSimulatedError(SimulatorError, NotImplementedError):
    """Valid torch_npu usage the simulator does not model; the message says what to do instead."""


class MissingWorkspaceError(SimulatorError):
    """An updatable launch of an op that takes a workspace ran without one: on hardware the kernel allocates
    its own, writes its address into the captured task and frees it when the launch returns, so later
    replays read and write memory that belongs to something else."""


class DanglingRecordError(SimulatorError):
    """torch_npu's dispatch record re-issued an op through a weak alias (``_weak_ref_tensor``) of a tensor
    that was freed since the capture: on hardware the update points the task at memory now used elsewhere."""
