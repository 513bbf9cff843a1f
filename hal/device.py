"""The ``Device`` facade: what runners and servers hold instead of a plugin.

A ``Device`` is created once per device name by the registry, with the owning plugin's hook
implementations already bound. Calls go straight to those functions: the hot path (``replay``) costs one
Python call into the plugin, never a search over plugins. Every graph it makes is a ``hal.DeviceGraph``:
the device's own full graphs wrapped in ``PluginGraph``, and the strategies registered in
``hal.graph_strategies`` (breakable, piecewise) built on them, which this module never imports.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Callable, Mapping, Sequence

import torch

from hal.all_reducer import AllReducer
from hal.conventions import DeviceConventions
from hal.device_id import DeviceId
from hal.errors import GraphHalError, PluginContractError, UnsupportedModeError
from hal.capture_state import ActiveCapture, tracked_session
from hal.graph import DeviceGraph
from hal.graph_modes import GraphMode
from hal.graph_strategies import strategy, strategy_modes
from hal.memory_stats import MemoryStats


def offered_modes(graph_modes: Sequence[str]) -> tuple[str, ...]:
    """Every mode a runner may ask for on a device whose own graph modes are ``graph_modes``: those, the
    strategies hal builds on full graphs (breakable, piecewise: every device with full graphs has them), and
    ``disabled``. What ``graphhal info`` shows for a device that is absent, too."""
    strategies = strategy_modes() if GraphMode.FULL in graph_modes else ()
    extra = (str(mode) for mode in (*strategies, GraphMode.DISABLED) if mode not in graph_modes)
    return (*graph_modes, *extra)


class Device:
    """One device as a runner sees it: graph factory, capture session, replay, update, plumbing."""

    def __init__(self, device_id: DeviceId, plugin_name: str, hooks: Mapping[str, Callable[..., Any]]) -> None:
        self.id = device_id
        self.plugin_name = plugin_name
        self._hooks = dict(hooks)
        # Every answer is checked once, here: a plugin that answers with the wrong type is named now, rather
        # than surfacing later as a bare AttributeError deep inside a runner.
        self.torch_device: torch.device = self._answer("hal_torch_device", torch.device, "a torch.device")
        modes = self._answer("hal_graph_modes", (list, tuple), "a list of graph mode names") or ()
        if not all(isinstance(mode, str) and mode for mode in modes):
            raise PluginContractError(plugin_name, "hal_graph_modes", modes, "a list of graph mode names")
        self.graph_modes: tuple[str, ...] = tuple(modes)
        self.needs_graph_update: bool = bool(self._answer("hal_needs_graph_update", bool, "True or False"))
        self.capture_executes_work: bool = bool(self._answer("hal_capture_executes_work", bool, "True or False"))
        self.capture_stream: Any = hooks["hal_capture_stream"](device_id)
        self.conventions: DeviceConventions = (
            self._answer("hal_conventions", DeviceConventions, "a hal.DeviceConventions") or DeviceConventions()
        )
        self.distributed_backend: str | None = self._answer("hal_distributed_backend", str, "a backend name")
        self.plugin_graphs_made = 0  # the device's own graphs made through this facade (segments, pieces included)

    def _answer(self, hook: str, expected: type | tuple[type, ...], description: str) -> Any:
        """The plugin's answer to a per-device hook: None or an instance of ``expected``."""
        value = self._hooks[hook](self.id)
        if value is not None and not isinstance(value, expected):
            raise PluginContractError(self.plugin_name, hook, value, description)
        return value

    # --- identity ---------------------------------------------------------------------------------------

    @property
    def type(self) -> str:
        return self.id.type

    @property
    def modes(self) -> tuple[str, ...]:
        """Every mode a runner may ask for here (``offered_modes`` of the device's own graph modes)."""
        return offered_modes(self.graph_modes)

    def __str__(self) -> str:
        return str(self.id)

    def __repr__(self) -> str:
        return f"Device({str(self.id)!r}, plugin={self.plugin_name!r}, modes={self.modes})"

    def hook(self, name: str) -> Callable[..., Any]:
        """The owning plugin's implementation of hook ``name`` (or its default), for graph objects."""
        return self._hooks[name]

    # --- graphs -----------------------------------------------------------------------------------------

    def check_mode(self, mode: str) -> None:
        """Raise ``UnsupportedModeError`` listing the supported modes unless ``mode`` is one of them."""
        if mode == GraphMode.AUTO:
            raise UnsupportedModeError(
                f"mode 'auto' is not a graph mode a device captures: a runner resolves it, before capturing, to one "
                f"of the modes device {self.id} offers ({', '.join(self.modes)}); ask for one of those here"
            )
        if mode not in self.modes:
            raise UnsupportedModeError(
                f"device {self.id} does not support graph mode '{mode}'; supported modes: {', '.join(self.modes)}"
            )

    def make_graph(self, mode: str) -> DeviceGraph:
        """A fresh, empty graph for ``mode`` (any of ``modes`` but ``disabled``)."""
        self.check_mode(mode)
        if mode in self.graph_modes:
            raw = self._hooks["hal_make_graph"](self.id, mode)
            self.plugin_graphs_made += 1
            if raw is None:
                expected = f"a graph object for {self.id} in mode '{mode}'"
                raise PluginContractError(self.plugin_name, "hal_make_graph", raw, expected)
            return PluginGraph(self, mode, raw)
        make = strategy(mode)
        if make is None:
            raise UnsupportedModeError(f"mode '{mode}' runs eagerly on {self.id}: there is no graph to make")
        return make(self)

    def graph_budget(self) -> int | None:
        """How many more of its own graphs the device can hold now (``hal_graph_budget``); None: no limit."""
        budget = self._hooks["hal_graph_budget"](self.id)
        if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool)):
            raise PluginContractError(self.plugin_name, "hal_graph_budget", budget, "a number of graphs or None")
        return budget

    def capture_session(self, graph: DeviceGraph, pool: Any = None) -> AbstractContextManager[Any]:
        """Context manager recording the work issued inside into ``graph``, allocating from ``pool``.

        Tensors produced inside hold valid values only after ``replay``, and they live in the pool: the
        next replay of any graph of that pool may overwrite them.
        """
        return self._own(graph).capture(pool)

    def replay(self, graph: DeviceGraph) -> None:
        """Launch ``graph``. Asynchronous where the device queues work."""
        self._own(graph).replay()

    def replayer(self, graph: DeviceGraph) -> Callable[[], None]:
        """A zero-argument callable that replays ``graph``: bind it once per graph, call it every step."""
        return self._own(graph).replay

    def update(self, graph: DeviceGraph, params: Mapping[str, Any]) -> None:
        """Refresh host-side values baked into ``graph`` before its next replay (``needs_graph_update``).

        ``params`` maps a slot role (``hal.SlotRole.SEQ_LENS``) to the live host values padded to the graph's
        shape. A strategy's graph passes them to every device graph it holds.
        """
        self._own(graph).update(params)

    def _own(self, graph: Any) -> DeviceGraph:
        if not isinstance(graph, DeviceGraph):
            raise GraphHalError(
                f"device {self.id} (plugin {self.plugin_name!r}) does not recognise graph {graph!r} as its own: "
                "only graphs made by Device.make_graph can be captured, replayed or updated"
            )
        return graph

    def compiled_capture_problem(self, mode: str, compiler: str) -> str | None:
        """Why this device cannot capture ``mode`` graphs of a forward compiled with ``compiler``; None when
        it can (``hal_compiled_capture_problem``). ``mode`` may be ``auto``: then the answer is about every mode
        auto could pick."""
        problem = self._hooks["hal_compiled_capture_problem"](self.id, mode, compiler)
        if problem is not None and not isinstance(problem, str):
            raise PluginContractError(self.plugin_name, "hal_compiled_capture_problem", problem, "a reason (str) or None")
        return problem

    # --- plumbing ---------------------------------------------------------------------------------------

    def graph_pool(self) -> Any:
        """A new memory pool that several graphs can share."""
        return self._hooks["hal_graph_pool"](self.id)

    def synchronize(self) -> None:
        self._hooks["hal_synchronize"](self.id)

    def event(self) -> Any:
        """A new event (``hal_event``): ``record()``, ``query()``, ``synchronize()``. On a device that runs work
        as it is issued (no ``hal_event``), one that is always complete."""
        event = self._hooks["hal_event"](self.id)
        if event is None:
            return CompletedEvent()
        if not all(callable(getattr(event, name, None)) for name in ("record", "query", "synchronize")):
            raise PluginContractError(self.plugin_name, "hal_event", event, "an event with record, query and synchronize")
        return event

    def check_group(self, group: Any) -> None:
        """Raise ``UnsupportedModeError`` unless this device's graphs can capture ``group``'s collectives."""
        import torch.distributed as dist  # only where process groups are used

        backend = str(dist.get_backend(group))
        if self.distributed_backend is None:
            raise UnsupportedModeError(
                f"device {self.id} (plugin {self.plugin_name!r}) declares no torch.distributed backend its graphs "
                "can capture (hal_distributed_backend), so runners on it cannot take a process group"
            )
        # A group made for several devices names each: "cpu:gloo,cuda:nccl".
        if self.distributed_backend not in backend.replace(":", ",").split(","):
            raise UnsupportedModeError(
                f"device {self.id} captures collectives of backend {self.distributed_backend!r}, but the process "
                f"group's backend is {backend!r}; make the group with backend={self.distributed_backend!r}"
            )

    def all_reducer(self, group: Any) -> AllReducer | None:
        """The device's own all-reduce for ``group`` (``hal_all_reducer``; a collective call), or None."""
        reducer = self._hooks["hal_all_reducer"](self.id, group)
        if reducer is not None and not isinstance(reducer, AllReducer):
            raise PluginContractError(self.plugin_name, "hal_all_reducer", reducer, "a hal.AllReducer (reduce and describe) or None")
        return reducer

    def release_cached_memory(self) -> None:
        """Give the allocator's cached, unused memory back to the device (``hal_release_cached_memory``)."""
        self._hooks["hal_release_cached_memory"](self.id)

    def memory_stats(self, pool: Any = None) -> MemoryStats:
        stats = self._hooks["hal_memory_stats"](self.id, pool)
        if stats is not None and not isinstance(stats, MemoryStats):
            raise PluginContractError(self.plugin_name, "hal_memory_stats", stats, "a hal.MemoryStats")
        return stats or MemoryStats()


class CompletedEvent:
    """The event of a device that runs work as it is issued: whatever was recorded has finished."""

    def record(self) -> None:
        return None

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


class PluginGraph(DeviceGraph):
    """A full graph of the device's own, as the owning plugin made it (``raw``), driven through its hooks."""

    def __init__(self, device: Device, mode: str, raw: Any) -> None:
        self.device = device
        self.mode = mode
        self.raw = raw
        self._replay_hook = device.hook("hal_replay")

    def capture(self, pool: Any) -> AbstractContextManager[Any]:
        # A break point reached inside must know it is inside a graph that cannot break.
        return tracked_session(self.session(pool), ActiveCapture(str(self.device), GraphMode.FULL))

    def session(self, pool: Any) -> AbstractContextManager[Any]:
        """The plugin's own capture session, leaving the thread's capture scope alone: for strategies that
        capture segments of a graph and mark the scope themselves."""
        session = self.device.hook("hal_capture_session")(self.raw, pool, self.device.capture_stream)
        if not isinstance(session, AbstractContextManager):
            raise PluginContractError(self.device.plugin_name, "hal_capture_session", session, "a context manager")
        return session

    def replay(self) -> None:
        self._replay_hook(self.raw)

    def update(self, params: Mapping[str, Any]) -> None:
        self.device.hook("hal_update")(self.raw, params)

    def drop(self) -> None:
        self.raw = None

    def __repr__(self) -> str:
        return f"PluginGraph({self.device}, {self.mode}, {self.raw!r})"
