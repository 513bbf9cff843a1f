"""Breakable graphs: one graph per shape, cut into segments at break points, built only on the device contract.

Capture records segment, eager step, segment, ...; every segment is an ordinary full-mode graph of the
device, captured into the same pool. Replay walks the same list: replay a segment, run an eager step (its
fresh result copied into the tensors the next segment reads), replay the next segment.

Every tensor that crosses a break (the step's arguments and its result) must be where the segments read it
at every replay. The result is the hazard: the eager function allocates it from the device's ordinary
allocator, which hands the memory to anyone once the last reference dies, and the next segment reads it at
that address for good (sglang issue 37606). So the result is copied into tensors allocated in the graph pool
(``_pooled``): what the next segment reads is pool memory, like everything a segment allocates. Once the
whole graph is captured, the steps keep only non-owning aliases of the tensors on the graph's device, and a
later (smaller) bucket's capture reuses that memory: a replay rewrites every tensor that crosses a break
before anything reads it, so buckets share the pool as full graphs do, instead of each holding its own.
Tensors off the device (host lengths handed to a break on a GPU) are not pool memory: the step keeps them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Union

import torch
from torch.utils import _pytree as pytree

from hal.breakable.break_points import BreakPoint
from hal.breakable.break_results import copy_back
from hal.capture_state import ActiveCapture, capture_scope
from hal.device import Device, PluginGraph
from hal.errors import GraphHalError, GraphStateError
from hal.graph import DeviceGraph
from hal.graph_modes import GraphMode
from hal.graph_strategies import register_strategy
from hal.pool_aliases import non_owning_alias


class SegmentEndError(GraphHalError, RuntimeError):
    """A captured segment could not be ended at a break (typically a side stream left un-joined)."""


@dataclass
class _EagerStep:
    point: BreakPoint
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    result: Any  # what the function returned at capture, in pool memory; segments after the break read it
    holder: Any = None  # the empty graph the result was allocated under, keeping its pool in use

    def replay(self) -> None:
        copy_back(self.result, self.point.function(*self.args, **self.kwargs), f"break point {self.point.name!r}")

    def let_tensors_leave(self, device: torch.device) -> None:
        """Keep only non-owning aliases of what crosses the break on ``device`` (after the whole graph is
        captured): such a tensor is pool memory a segment allocated, a result ``_pooled`` copied there, or
        something its owner keeps (weights, the KV cache, the runner's buffers). Anything else (a host tensor
        of lengths, on a device whose pool is not host memory) stays owned here: nothing else would keep it."""
        self.args = _aliases_on(device, self.args)
        self.kwargs = _aliases_on(device, self.kwargs)
        self.result = _aliases_on(device, self.result)


def _aliases_on(device: torch.device, value: Any) -> Any:
    return pytree.tree_map_only(torch.Tensor, lambda t: non_owning_alias(t) if t.device == device else t, value)


class BreakableGraph(DeviceGraph):
    """The graph of mode ``breakable``: segments (full graphs of the device) and the eager steps between."""

    mode = GraphMode.BREAKABLE.value

    def __init__(self, device: Device) -> None:
        self.device = device
        self.steps: list[Union[PluginGraph, _EagerStep]] = []
        self.captured = False

    @property
    def segments(self) -> list[PluginGraph]:
        """The device's own graphs this graph replays between its breaks, in order."""
        return [step for step in self.steps if isinstance(step, PluginGraph)]

    @property
    def num_breaks(self) -> int:
        return sum(isinstance(step, _EagerStep) for step in self.steps)

    def capture(self, pool: Any) -> "BreakableCapture":
        if self.captured or self.steps:
            raise GraphStateError(
                f"this breakable {self.device} graph is already captured: make a new graph per capture "
                "(Device.make_graph)"
            )
        return BreakableCapture(self, pool)

    def replay(self) -> None:
        if not self.captured:
            raise GraphStateError(
                f"replay of a breakable {self.device} graph that was never captured (or whose capture failed): "
                "capture it first (Device.capture_session), or make a new graph and capture that"
            )
        for step in self.steps:
            step.replay()

    def update(self, params: Mapping[str, Any]) -> None:
        """Each segment is a full graph of the device: each gets the host values."""
        for segment in self.segments:
            segment.update(params)

    def drop(self) -> None:
        self.steps.clear()
        self.captured = False


class BreakableCapture:
    """Context manager for one breakable capture: segments open and close around each break reached."""

    def __init__(self, graph: BreakableGraph, pool: Any) -> None:
        self._graph = graph
        self._device = graph.device
        self._pool = pool
        self._session: Any = None
        self._scope: Any = None

    def __enter__(self) -> BreakableGraph:
        self._scope = capture_scope(ActiveCapture(str(self._device), GraphMode.BREAKABLE, self))
        self._scope.__enter__()
        try:
            self._open_segment()
        except BaseException:
            self._scope.__exit__(None, None, None)
            raise
        return self._graph

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        try:
            if self._session is not None:
                self._close_segment(exc_type, exc, tb, where="at the end of the capture")
        except BaseException:
            self._graph.steps.clear()
            raise
        finally:
            self._scope.__exit__(None, None, None)
        if exc_type is not None:
            self._graph.steps.clear()  # nothing half-captured survives
            return
        for step in self._graph.steps:
            if isinstance(step, _EagerStep):
                step.let_tensors_leave(self._device.torch_device)
        self._graph.captured = True

    def cut(self, point: BreakPoint, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Called by a break point: end the segment, run the function eagerly, open the next segment."""
        self._close_segment(None, None, None, where=f"before break point {point.name!r}")
        if not self._device.capture_executes_work:
            # The segment was only recorded: run it once so the break computes on real values (lengths,
            # indices) rather than on uninitialised pool memory, which could fault or change shapes.
            self._graph.steps[-1].replay()
            self._device.synchronize()
        with capture_scope(None):  # break points inside the eager function are plain calls
            result = point.function(*args, **kwargs)
        result, holder = self._pooled(result, args, kwargs)
        self._graph.steps.append(_EagerStep(point, args, kwargs, result, holder))
        self._open_segment()
        return result

    def _pooled(self, result: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        """``result`` with every fresh tensor copied into one allocated in the pool (the module docstring says
        why), and the graph whose capture allocated them. Tensors over an argument's memory (a function that
        wrote into its input and returned it) stay as they are: that memory is already where segments read."""
        given = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        device = self._device.torch_device
        fresh = [  # a result off the device (host values) stays as it is, owned by the step (let_tensors_leave)
            t for t in pytree.tree_leaves(result)
            if isinstance(t, torch.Tensor) and t.device == device and t.untyped_storage().data_ptr() not in given
        ]
        if not fresh:
            return result, None
        holder = self._device.make_graph(GraphMode.FULL)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Gg]raph is empty.*")
            with holder.session(self._pool):  # records nothing: only allocates in the pool
                pooled = {id(t): torch.empty_like(t) for t in fresh}
        for t in fresh:
            pooled[id(t)].copy_(t)  # eagerly, outside any capture: real values for what reads them next
        return pytree.tree_map_only(torch.Tensor, lambda t: pooled.get(id(t), t), result), holder

    def _open_segment(self) -> None:
        segment = self._device.make_graph(GraphMode.FULL)
        session = segment.session(self._pool)  # the breakable scope stays: break points cut this segment
        session.__enter__()
        self._session = session  # only a session that began capturing is ever ended
        self._graph.steps.append(segment)

    def _close_segment(self, exc_type, exc, tb, *, where: str) -> None:  # type: ignore[no-untyped-def]
        session, self._session = self._session, None
        try:
            with warnings.catch_warnings():
                # A segment between two adjacent breaks is legitimately empty; devices warn about empty graphs.
                warnings.filterwarnings("ignore", message=".*[Gg]raph is empty.*")
                session.__exit__(exc_type, exc, tb)
        except Exception as error:
            if exc_type is not None:
                return  # the body's own error is the one to report
            raise SegmentEndError(
                f"ending the captured segment {where} on {self._device} failed: {type(error).__name__}: {error}. "
                "If the segment forked work onto a side stream, join it back (wait_stream) before the break."
            ) from error


register_strategy(GraphMode.BREAKABLE, BreakableGraph)
