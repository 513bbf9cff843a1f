"""The SIMULATED NPU graph: capture records launches, replay re-issues them, task groups update them.

Semantics followed (aclmdlRI stream capture as torch_npu's NPUGraph drives it, the same on every profile):

- ``DeviceQueue`` stands for the device's streams while a stream of this thread captures or updates: a
  dispatch mode slid under every other mode on the thread's stack when a capture or an update begins (so
  it sits below torch_npu's capture mode and a plugin's, as the stream sits below them on hardware, whatever
  order they were entered in) and taken out when it ends. Outside captures and updates no mode of the
  simulator is active, as no mode of real torch_npu is: torch.compile sees the same dispatch state as on
  hardware (an always-on mode made torch 2.9 compile a piecewise forward again). It is an infra mode:
  hardware is invisible to Dynamo.
- While a stream captures a graph (``capture_begin`` on this thread), every op issued on it is recorded with
  its arguments. Host values are baked in: a Python int stays its capture value, and the host arguments of
  the simulated kernels (attention lengths) are copied at capture. Reading a tensor on the host inside the
  capture is an error. The captured work does not count as run: outputs of recorded ops hold NaN until the
  first replay.
- Replay re-issues the recorded ops on the same tensors, in order, as one task on the current stream.
- ``graph_task_group_begin/end(stream)`` bracket launches into a task group; the handle names it.
  ``ExternalEvent.wait/reset`` issued on the capturing stream before a group gate it: at replay the group
  waits for the event (never recorded: the replay would hang) and re-arms it. Groups cannot nest.
- ``graph_task_update_begin(stream, handle)`` ... ``graph_task_update_end(stream)``: the ops issued on
  ``stream`` in between are not run; they replace the recorded launches' host arguments (tensors must be the
  captured ones). The update is a task on ``stream``. An update left open (its re-issue raised before
  ``graph_task_update_end``) keeps the stream updating: the next ``graph_task_update_begin`` there fails.
- An updatable launch (in a task group) of an op that takes a workspace must be given one, at capture and
  at every update (``MissingWorkspaceError``).
- A task holds addresses, not tensors (``weak_refs``): memory the capture allocated stays with the graph's
  pool, any other tensor must be kept alive by its owner, and a replay through freed memory is an error.

Not simulated: kernels that bypass the dispatcher (Inductor's compiled CPU kernels) are invisible to the
device queue, so the simulator cannot capture them, where a real stream capture would.

Ordering the simulator enforces (``clocks``): a replay that reads a group's host values needs the group's
latest update to finish before it (``StaleHostValuesError``), and an update needs every earlier replay that
read the group to finish before it (``UpdateRaceError``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from support.npu_simulator import kernels, state
from support.npu_simulator.clocks import Clock, Task, joined
from support.npu_simulator.errors import (
    MissingWorkspaceError,
    HostReadDuringCaptureError,
    NotSimulatedError,
    SimulatedHangError,
    SimulatorError,
    StaleHostValuesError,
    UpdateRaceError,
)
from support.npu_simulator.streams import ExternalEvent, Stream
from support.npu_simulator.weak_refs import MemoryRef, resolved

_UNINITIALISED_FACTORIES = frozenset(
    {
        torch.ops.aten.empty.memory_format,
        torch.ops.aten.empty_like.default,
        torch.ops.aten.empty_strided.default,
        torch.ops.aten.new_empty.default,
        torch.ops.aten.new_empty_strided.default,
    }
)
_HOST_SYNC_TAGS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)
# Tagged dynamic_output_shape for their boolean-mask form only: with integer indices the output shape is the
# indices', and the kernel reads nothing on the host (a gather).
_DYNAMIC_WITH_MASKS_ONLY = frozenset({torch.ops.aten.index.Tensor})


def _reads_on_host(func: Any, args: tuple[Any, ...]) -> bool:
    """The op must read tensor values on the host to run (its output shape or result depends on them)."""
    if not any(tag in func.tags for tag in _HOST_SYNC_TAGS):
        return False
    if func in _DYNAMIC_WITH_MASKS_ONLY:
        indices = args[1] if len(args) > 1 else ()
        return any(index is not None and index.dtype in (torch.bool, torch.uint8) for index in indices)
    return True


@dataclass
class _OpNode:
    func: torch._ops.OpOverload
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: list[torch.Tensor]  # what a functional op produced at capture; refilled on replay
    host_values: dict[str, Any]  # the simulated kernels' host arguments as the task holds them now
    group: "TaskGroup | None" = None

    def run(self) -> None:
        args, kwargs = resolved((self.args, self.kwargs), f"the replay of {self.func}")
        for name, value in self.host_values.items():
            args, kwargs = kernels.with_argument(self.func, args, kwargs, name, value)
        result = self.func(*args, **kwargs)
        if self.outputs:
            fresh = [leaf for leaf in tree_leaves(result) if isinstance(leaf, torch.Tensor)]
            for target, value in zip(self.outputs, fresh):
                target.copy_(value)


@dataclass
class _GateNode:
    event: ExternalEvent


@dataclass
class _ResetNode:
    event: ExternalEvent


@dataclass(eq=False)
class TaskGroup:
    """A captured task group; what ``graph_task_group_end`` returns (torch_npu: ``_NPUTaskGroupHandle``)."""

    graph: "SimGraph"
    number: int
    gate: ExternalEvent | None  # the ExternalEvent waited on just before the group, if any
    ops: list[_OpNode] = field(default_factory=list)
    updated_by: Task | None = None  # the latest update; None: the group still holds its capture values
    reads: dict[int, Task] = field(default_factory=dict)  # stream id -> latest replay that read the group

    def __repr__(self) -> str:
        ops = ", ".join(str(op.func) for op in self.ops)
        return f"<simulated npu task group {self.number} of graph {self.graph.number}: {ops}>"

    def check_read(self, replay: Task, clock: Clock) -> None:
        """A replay (``replay``, having waited for ``clock``) reads this group's host values."""
        if self.updated_by is None:
            values = "; ".join(f"{name}={value}" for op in self.ops for name, value in op.host_values.items())
            raise StaleHostValuesError(
                f"{replay} runs {self!r} with the host values baked at capture ({values}): no update since capture"
            )
        if not self.updated_by.finished_before(clock):
            raise StaleHostValuesError(
                f"{replay} reads the host values of {self!r}, but their update, {self.updated_by}, is not ordered "
                "before it (record the group's ExternalEvent after graph_task_update_end, on the update's stream): "
                "on hardware the replay may read the previous values"
            )
        self.reads[replay.stream_id] = replay


class SimGraph:
    """The recorded work of one simulated NPUGraph."""

    _count = 0

    def __init__(self) -> None:
        SimGraph._count += 1
        self.number = SimGraph._count
        self.nodes: list[Any] = []
        self.groups: list[TaskGroup] = []
        self.captured = False
        self.capture_stream: Stream | None = None
        self.pool: Any = None
        self.allocated: list[torch.Tensor] = []  # tensors the capture allocated (graph memory)
        self._pool_pointers: set[int] = set()  # their storages: memory the graph pool keeps
        self._open_group: TaskGroup | None = None
        self._gate: ExternalEvent | None = None  # waited on since the last group: gates the next one
        self.replays = 0

    # --- capture ------------------------------------------------------------------------------------------

    def begin(self, stream: Stream, pool: Any) -> None:
        sim = state.current()
        if self.captured or self.capture_stream is not None:
            raise SimulatorError(f"graph {self.number} is already captured; reset() it or make a new NPUGraph")
        if sim.capturing_graph is not None:
            raise SimulatorError("another NPU graph is being captured on this thread: captures cannot nest")
        self.capture_stream, self.pool = stream, pool
        stream.capturing = self
        sim.capturing_graph = self
        device_queue_on(sim)

    def stop(self) -> None:
        """The stream stops capturing (AclmdlRICaptureEnd returned, successfully or not)."""
        sim = state.current()
        if self.capture_stream is not None:
            self.capture_stream.capturing = None
        if sim.capturing_graph is self:
            device_queue_off(sim)
        sim.capturing_graph = None

    def end(self) -> None:
        if self.capture_stream is None or self.capture_stream.capturing is not self:
            raise SimulatorError("capture_end() without capture_begin()")
        self.stop()
        if self._open_group is not None:
            self._open_group = None
            raise SimulatorError("capture ended inside a task group: graph_task_group_begin without graph_task_group_end")
        self.captured = True
        # The stream only recorded: memory the capture allocated holds no value before the first replay.
        for tensor in self.allocated:
            if tensor.is_floating_point() or tensor.is_complex():
                tensor.fill_(math.nan)

    def owns_memory(self, tensor: torch.Tensor) -> bool:
        """``tensor``'s memory was allocated by this graph's capture (graph-pool memory the pool keeps)."""
        return tensor.untyped_storage().data_ptr() in self._pool_pointers

    def _allocate(self, tensors: list[torch.Tensor]) -> None:
        self.allocated.extend(tensors)
        self._pool_pointers.update(tensor.untyped_storage().data_ptr() for tensor in tensors)

    def _addresses(self, value: Any) -> Any:
        """What the task keeps of its arguments: pool memory held, any other tensor by address only."""
        return tree_map(
            lambda leaf: leaf if not isinstance(leaf, torch.Tensor) or self.owns_memory(leaf) else MemoryRef(leaf, False),
            value,
        )

    def reset(self) -> None:
        if self.capture_stream is not None and self.capture_stream.capturing is self:
            raise SimulatorError("reset() of a graph that is still capturing; end the capture first")
        self._pool_pointers = set()
        self.nodes, self.groups, self.allocated = [], [], []
        self.captured, self.capture_stream, self._gate = False, None, None

    def record(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], stream: Stream) -> Any:
        """Record (and run) one op issued on this thread while this graph captures."""
        if _reads_on_host(func, args):
            raise HostReadDuringCaptureError(
                f"{func} reads a tensor's values on the host while an NPU graph is being captured"
            )
        if stream is not self.capture_stream:
            raise NotSimulatedError(
                f"{func} was issued on {stream!r} while graph {self.number} captures on {self.capture_stream!r}: "
                "multi-stream capture is not simulated"
            )
        if self._open_group is not None and kernels.allocates_workspace(func):
            _check_workspace_given(func, kwargs, f"captured into {self._open_group!r}")
        sim = state.current()
        sim.ops_running.append(func)
        try:
            result = func(*args, **kwargs)
        finally:
            sim.ops_running.pop()
        if func in _UNINITIALISED_FACTORIES:
            self._allocate([result])  # graph memory: garbage until a replayed op writes it
            return result
        if func.is_view or torch.Tag.inplace_view in func.tags:
            return result  # views follow the memory the other ops refresh; metadata changes are not replayed
        host_values = {
            name: kernels.copy_host_value(kernels.argument_value(func, args, kwargs, name))
            for name in kernels.host_arguments(func)
        }
        inputs = {leaf.data_ptr() for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)}
        outputs = (
            []
            if func._schema.is_mutable
            else [t for t in tree_leaves(result) if isinstance(t, torch.Tensor) and t.data_ptr() not in inputs]
        )
        self._allocate(outputs)
        self.record_op(_OpNode(func, self._addresses(tuple(args)), self._addresses(dict(kwargs)), outputs, host_values))
        return result

    def record_op(self, node: _OpNode) -> None:
        if self._open_group is not None:
            node.group = self._open_group
            self._open_group.ops.append(node)
        self.nodes.append(node)

    def add_gate(self, event: ExternalEvent) -> None:
        self.nodes.append(_GateNode(event))
        self._gate = event

    def add_reset(self, event: ExternalEvent) -> None:
        self.nodes.append(_ResetNode(event))

    def begin_group(self) -> None:
        if self._open_group is not None:
            raise SimulatorError("graph_task_group_begin inside an open task group: groups cannot nest")
        self._open_group = TaskGroup(self, len(self.groups) + 1, self._gate)
        self._gate = None

    def end_group(self) -> TaskGroup:
        group, self._open_group = self._open_group, None
        if group is None:
            raise SimulatorError("graph_task_group_end without graph_task_group_begin")
        if not group.ops:
            raise SimulatorError("graph_task_group_end: the task group holds no launch")
        self.groups.append(group)
        return group

    # --- replay -------------------------------------------------------------------------------------------

    def replay(self) -> None:
        sim = state.current()
        if not self.captured:
            raise SimulatorError(f"replay of graph {self.number}, which was never captured (or was reset)")
        stream = sim.current_stream()
        if stream.capturing is not None:
            raise SimulatorError("replaying a graph inside a capture is not allowed")
        self.replays += 1
        task = stream.issue(f"replay {self.replays} of graph {self.number}")
        clock = dict(stream.clock)  # what the replay waited for; grows as it passes gates
        sim.replaying += 1
        try:
            for node in self.nodes:
                if isinstance(node, _GateNode):
                    if node.event.recorded is None:
                        raise SimulatedHangError(
                            f"{task}: a gated task waits on its ExternalEvent, which no update recorded since the "
                            "previous replay: on hardware this replay would hang (update before every replay)"
                        )
                    clock = joined(clock, node.event.recorded)
                elif isinstance(node, _ResetNode):
                    node.event.recorded = None
                else:
                    if node.group is not None:
                        node.group.check_read(task, clock)
                    elif node.host_values:
                        raise StaleHostValuesError(
                            f"{task} runs {node.func} with host values baked at capture ({node.host_values}); it is "
                            "in no task group, so no update can ever change them (capture with "
                            "auto_dispatch_capture=True, or bracket it with graph_task_group_begin/end)"
                        )
                    node.run()
        finally:
            sim.replaying -= 1
        stream.clock = joined(stream.clock, clock)  # the stream waited at the gates


class DeviceQueue(TorchDispatchMode):
    """The device's streams, as the dispatch mode at the bottom of the stack: records what a capturing stream
    is given, hands what an updating stream is given to the update, runs everything else."""

    @classmethod
    def is_infra_mode(cls) -> bool:
        return True  # the device, not a Python-level mode: Dynamo must not skip compiled frames for it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        sim = state.current()
        stream = sim.current_stream()
        if stream.updating is not None:
            return stream.updating.take(func, args, kwargs)
        graph = sim.capturing_graph
        if graph is None:
            return func(*args, **kwargs)
        return graph.record(func, args, kwargs, stream)


def device_queue_on(sim: state.SimulatorState) -> None:
    """Slide the device queue under every mode on this thread's stack (a capture or an update begins)."""
    depth = sim.queue_depth
    sim.queue_depth = depth + 1
    if depth:
        return
    above = [torch.utils._python_dispatch._pop_mode() for _ in range(torch._C._len_torch_dispatch_stack())]
    queue = DeviceQueue()
    queue.__enter__()  # the flags it saves are those of the modes above, which stay entered
    sim.device_queue = queue
    for mode in reversed(above):
        torch.utils._python_dispatch._push_mode(mode)


def device_queue_off(sim: state.SimulatorState, *, all_of_it: bool = False) -> None:
    """Take the device queue out from under the modes above it (the capture or update ended; ``all_of_it``:
    the simulator is uninstalled, whatever is still open)."""
    if not sim.queue_depth:
        return
    sim.queue_depth = 0 if all_of_it else sim.queue_depth - 1
    if sim.queue_depth:
        return
    queue, sim.device_queue = sim.device_queue, None
    stack = torch.utils._python_dispatch._get_current_dispatch_mode_stack()
    if queue not in stack:
        return  # someone popped it already
    above = [torch.utils._python_dispatch._pop_mode() for _ in range(len(stack) - 1 - stack.index(queue))]
    queue.__exit__(None, None, None)  # restores the flags as the modes above had them
    for mode in reversed(above):
        torch.utils._python_dispatch._push_mode(mode)


# --- task groups (torch.npu.graph_task_*) -----------------------------------------------------------------


def graph_task_group_begin(stream: Stream) -> None:
    if stream.capturing is None:
        raise SimulatorError(f"graph_task_group_begin({stream!r}): the stream is not capturing a graph")
    stream.capturing.begin_group()


def graph_task_group_end(stream: Stream) -> TaskGroup:
    if stream.capturing is None:
        raise SimulatorError(f"graph_task_group_end({stream!r}): the stream is not capturing a graph")
    return stream.capturing.end_group()


@dataclass
class _Update:
    """An update in progress on ``stream``: the ops issued there become new host values of ``group``'s launches."""

    stream: Stream
    group: TaskGroup
    values: list[dict[str, Any]] = field(default_factory=list)

    def take(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if _makes_host_tensor(func) or func.is_view:
            # building a host argument (torch.tensor(...)) or a view of captured memory is no device launch
            return func(*args, **kwargs)
        position = len(self.values)
        if position >= len(self.group.ops):
            raise SimulatorError(f"the update of {self.group!r} re-issued more launches than the group holds ({func})")
        node = self.group.ops[position]
        if func is not node.func:
            raise SimulatorError(f"the update of {self.group!r} re-issued {func}, but the group's launch is {node.func}")
        if kernels.allocates_workspace(func):
            _check_workspace_given(func, kwargs, f"re-issued to update {self.group!r}")
        host = kernels.host_arguments(func)
        for argument in func._schema.arguments:
            if argument.name in host:
                continue
            old = _maybe_argument(func, node.args, node.kwargs, argument.name)
            old = resolved(old, f"the update of {self.group!r}")
            new = _maybe_argument(func, args, kwargs, argument.name)
            if not _same_argument(old, new):
                raise SimulatorError(
                    f"the update of {self.group!r} changed {func}'s argument {argument.name!r}: only its host "
                    f"arguments ({', '.join(host) or 'none'}) can change; tensors must be the captured ones"
                )
        self.values.append(
            {name: kernels.copy_host_value(kernels.argument_value(func, args, kwargs, name)) for name in host}
        )
        return _update_result(func, kwargs)


def _update_result(func: Any, kwargs: dict[str, Any]) -> Any:
    """What the re-issued call returns to its caller (nothing runs): the out tensors an .out overload returns."""
    if "out" in kwargs and isinstance(kwargs["out"], (list, tuple)):
        return tuple(kwargs["out"])
    return None


def _check_workspace_given(func: Any, kwargs: dict[str, Any], where: str) -> None:
    if kwargs.get("workspace") is not None:
        return
    if kernels.takes_workspace(func):
        fix = "Pass the workspace the capture allocated (its get_workspace helper), and the same one at every update"
    else:
        fix = f"This build's {func} takes no workspace at all: it cannot be updated safely"
    raise MissingWorkspaceError(
        f"{func} was {where} without a workspace: on hardware its kernel allocates one, writes its address into the "
        f"task and frees it when the launch returns, so every later replay uses freed memory. {fix}"
    )


def graph_task_update_begin(stream: Stream, handle: TaskGroup) -> None:
    if not isinstance(handle, TaskGroup):
        raise TypeError(f"graph_task_update_begin: handle must come from graph_task_group_end, got {type(handle).__name__}")
    if stream.capturing is not None:
        raise SimulatorError("graph_task_update_begin on a stream that is capturing")
    if stream.updating is not None:
        raise SimulatorError(
            f"graph_task_update_begin on {stream!r}, which is still updating {stream.updating.group!r} (an update "
            "whose re-issue failed was never ended with graph_task_update_end)"
        )
    stream.updating = _Update(stream, handle)
    device_queue_on(state.current())


def graph_task_update_end(stream: Stream) -> None:
    update = stream.updating
    if update is None:
        raise SimulatorError(f"graph_task_update_end({stream!r}) without graph_task_update_begin")
    stream.updating = None
    device_queue_off(state.current())
    group = update.group
    if len(update.values) != len(group.ops):
        raise SimulatorError(
            f"the update of {group!r} re-issued {len(update.values)} of its {len(group.ops)} launch(es) between "
            "graph_task_update_begin and graph_task_update_end"
        )
    task = stream.issue(f"update of task group {group.number} of graph {group.graph.number}")
    for read in group.reads.values():
        if not read.finished_before(stream.clock):
            raise UpdateRaceError(
                f"{task} rewrites the host values of {group!r} while {read}, which reads them, may not have "
                "finished: make the update's stream wait for an event recorded after that replay"
            )
    for op, values in zip(group.ops, update.values):
        op.host_values = values
    group.updated_by = task


_MISSING = object()
_HOST_TENSOR_OPS = frozenset({torch.ops.aten.lift_fresh.default, torch.ops.aten.lift.default})


def _makes_host_tensor(func: torch._ops.OpOverload) -> bool:
    """Ops that only create a tensor from host data: factories without tensor inputs, and lift (torch.tensor)."""
    if func in _HOST_TENSOR_OPS:
        return True
    return not any(isinstance(argument.type, torch.TensorType) or "Tensor" in str(argument.type) for argument in func._schema.arguments)


def _maybe_argument(func: Any, args: Any, kwargs: dict[str, Any], name: str) -> Any:
    try:
        return kernels.argument_value(func, args, kwargs, name)
    except KeyError:
        return _MISSING


def _same_argument(old: Any, new: Any) -> bool:
    if isinstance(old, torch.Tensor) or isinstance(new, torch.Tensor):
        return (
            isinstance(old, torch.Tensor)
            and isinstance(new, torch.Tensor)
            and old.data_ptr() == new.data_ptr()
            and old.shape == new.shape
            and old.dtype == new.dtype
        )
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return len(old) == len(new) and all(_same_argument(a, b) for a, b in zip(old, new))
    return old is new or old == new
