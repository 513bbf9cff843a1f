"""SIMULATED ``torch.npu.Stream``, ``Event``, ``ExternalEvent`` and ``torch.npu.stream(...)``.

Work runs when the host issues it; what the classes track is the order the device would guarantee
(``clocks``). Semantics followed (torch_npu/npu/streams.py, the same from 7.1 to 26.0, as CUDA's): a stream runs its tasks in issue order;
``stream.wait_event(event)`` makes later tasks on the stream wait for the work recorded in the event;
``event.synchronize()`` / ``stream.synchronize()`` / ``torch.npu.synchronize()`` make the host wait.

``ExternalEvent`` is the gate of task groups: issued on a capturing stream, ``wait`` and ``reset`` become
nodes of the graph (the replayed task waits until the event is recorded, then re-arms it); outside a capture
``record`` marks it recorded, after the work issued so far on the stream.
"""

from __future__ import annotations

from typing import Any

import torch

from support.npu_simulator import state
from support.npu_simulator.clocks import Clock, Task, joined
from support.npu_simulator.errors import NotSimulatedError, SimulatedHangError


def _device_index(device: Any) -> int:
    sim = state.current()
    if device is None:
        return sim.current_device
    if isinstance(device, torch.device):
        device = device.index if device.index is not None else sim.current_device
    if isinstance(device, str):
        device = int(device.rpartition(":")[2] or sim.current_device)
    return sim.check_device(int(device))


class Stream:
    """A simulated NPU stream (``torch.npu.Stream(device=None, priority=0)``)."""

    def __init__(self, device: Any = None, priority: int = 0) -> None:
        sim = state.current()
        self.device_index = _device_index(device)
        self.priority = priority
        self.id = sim.add_stream(self)
        self.clock: Clock = {}  # what this stream's next task waits for, itself included
        self.capturing: Any = None  # the graph this stream records into
        self.updating: Any = None  # the task group a graph_task_update_begin on this stream is updating

    def issue(self, label: str) -> Task:
        """A new task at the end of this stream: after this stream's earlier tasks, what it waited on, and
        whatever the host had already waited for."""
        clock = joined(self.clock, state.current().host_clock)
        seq = clock.get(self.id, 0) + 1
        clock[self.id] = seq
        self.clock = clock
        return Task(self.id, seq, label)

    def wait_event(self, event: "Event") -> None:
        event.wait(self)

    def wait_stream(self, stream: "Stream") -> None:
        if self.capturing is not None or stream.capturing is not None:
            raise NotSimulatedError("joining streams inside a capture (fork/join capture) is not simulated")
        self.clock = joined(self.clock, stream.clock)

    def synchronize(self) -> None:
        state.current().host_synchronize(self.clock)

    def query(self) -> bool:
        return True  # work runs when issued

    def __repr__(self) -> str:
        return f"<simulated npu Stream {self.id} on npu:{self.device_index}>"


class Event:
    """A simulated ``torch.npu.Event``: marks the work issued so far on a stream."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> None:
        state.current()
        self.clock: Clock | None = None

    def record(self, stream: Stream | None = None) -> None:
        stream = stream or state.current().current_stream()
        if stream.capturing is not None:
            raise NotSimulatedError("recording a torch.npu.Event inside a capture is not simulated")
        self.clock = dict(stream.clock)

    def wait(self, stream: Stream | None = None) -> None:
        stream = stream or state.current().current_stream()
        if stream.capturing is not None:
            raise NotSimulatedError("waiting on a torch.npu.Event inside a capture is not simulated")
        if self.clock is not None:  # an event never recorded is complete: waiting on it is a no-op
            stream.clock = joined(stream.clock, self.clock)

    def synchronize(self) -> None:
        if self.clock is not None:
            state.current().host_synchronize(self.clock)

    def query(self) -> bool:
        return True


class ExternalEvent:
    """A simulated ``torch.npu.ExternalEvent``: gates a captured task until an update records it."""

    def __init__(self) -> None:
        state.current()
        self.recorded: Clock | None = None  # the work the record followed; None while not recorded

    def record(self, stream: Stream | None = None) -> None:
        stream = stream or state.current().current_stream()
        if stream.capturing is not None:
            raise NotSimulatedError("recording an ExternalEvent inside a capture is not simulated")
        self.recorded = dict(stream.clock)

    def wait(self, stream: Stream | None = None) -> None:
        stream = stream or state.current().current_stream()
        if stream.capturing is not None:
            stream.capturing.add_gate(self)
            return
        if self.recorded is None:
            raise SimulatedHangError(
                f"{stream!r} waits on an ExternalEvent that was never recorded: on hardware it would wait forever"
            )
        stream.clock = joined(stream.clock, self.recorded)

    def reset(self, stream: Stream | None = None) -> None:
        stream = stream or state.current().current_stream()
        if stream.capturing is not None:
            stream.capturing.add_reset(self)
        else:
            self.recorded = None


class StreamContext:
    """``torch.npu.stream(s)``: ``s`` is the current stream, and its device the current device, inside the block
    (None: no change). A plain object, as torch_npu's StreamContext (torch_npu/npu/utils.py L150-200 at
    v7.1.0): a block left without ``__exit__`` (a failing ``torch.npu.graph.__exit__``) keeps ``s`` current."""

    def __init__(self, chosen: Stream | None) -> None:
        self.stream = chosen
        self._previous: tuple[int, Stream] | None = None

    def __enter__(self) -> Stream | None:
        if self.stream is None:
            return None
        sim = state.current()
        previous_device, sim.current_device = sim.current_device, self.stream.device_index
        self._previous = (previous_device, sim.set_current_stream(self.stream))
        return self.stream

    def __exit__(self, *exc: Any) -> None:
        if self._previous is None:
            return
        sim = state.current()
        previous_device, previous_stream = self._previous
        sim.set_current_stream(previous_stream)
        sim.current_device = previous_device
        self._previous = None


def stream(chosen: Stream | None) -> StreamContext:
    return StreamContext(chosen)


class device:  # noqa: N801 - torch_npu's name
    """``torch.npu.device(index)``: ``index`` is the current device inside the block."""

    def __init__(self, index: Any) -> None:
        self.index = _device_index(index)
        self._previous: int | None = None

    def __enter__(self) -> None:
        sim = state.current()
        self._previous, sim.current_device = sim.current_device, self.index

    def __exit__(self, *exc: Any) -> None:
        assert self._previous is not None
        state.current().current_device = self._previous
