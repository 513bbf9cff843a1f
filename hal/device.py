"""The ``Device`` facade: what runners and servers hold instead of a plugin.

A ``Device`` is created once per device name by the registry, with the owning plugin's hook
implementations already bound. Calls go straight to those functions: the hot path (``replay``) costs one
Python call into the plugin, never a search over plugins.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Callable, Mapping

import torch

from hal.breakable_graph import BREAKABLE_MODE, BreakableGraph
from hal.capture_state import ActiveCapture, tracked_session
from hal.conventions import DeviceConventions
from hal.device_id import DeviceId
from hal.errors import GraphHalError, PluginContractError, UnsupportedModeError
from hal.piecewise_backend import PIECEWISE_MODE
from hal.memory_stats import MemoryStats

# Eager execution through the runner API; every device offers it, no plugin declares it.
EAGER_MODE = "disabled"


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
        self.captures_compiled_kernels: bool = bool(
            self._answer("hal_captures_compiled_kernels", bool, "True or False")
        )
        self.conventions: DeviceConventions = (
            self._answer("hal_conventions", DeviceConventions, "a hal.DeviceConventions") or DeviceConventions()
        )
        # Bound once so replay and update are plain attribute calls.
        self._replay = hooks["hal_replay"]
        self._update = hooks["hal_update"]

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
        """Every mode a runner may ask for here: the device's own graph modes, ``breakable`` and ``piecewise``
        (built by hal on top of full graphs, so every device with full graphs has them), and ``disabled``."""
        strategies = (BREAKABLE_MODE, PIECEWISE_MODE) if "full" in self.graph_modes else ()
        return (*self.graph_modes, *strategies, EAGER_MODE)

    def __str__(self) -> str:
        return str(self.id)

    def __repr__(self) -> str:
        return f"Device({str(self.id)!r}, plugin={self.plugin_name!r}, modes={self.modes})"

    # --- graphs -----------------------------------------------------------------------------------------

    def check_mode(self, mode: str) -> None:
        """Raise ``UnsupportedModeError`` listing the supported modes unless ``mode`` is one of them."""
        if mode not in self.modes:
            raise UnsupportedModeError(
                f"device {self.id} does not support graph mode {mode!r}; supported modes: {', '.join(self.modes)}"
            )

    def make_graph(self, mode: str) -> Any:
        """A fresh, empty graph for ``mode`` (any of ``modes`` but ``disabled``)."""
        if mode == BREAKABLE_MODE and mode in self.modes:
            return BreakableGraph(self)
        if mode == PIECEWISE_MODE and mode in self.modes:
            raise UnsupportedModeError(
                "a piecewise graph is not one graph object: compile the forward with hal.PiecewiseBackend "
                "(runners do this for mode 'piecewise'), which captures each piece as a full graph"
            )
        if mode not in self.graph_modes:
            self.check_mode(mode)  # names the supported modes
            raise UnsupportedModeError(f"mode {mode!r} runs eagerly on {self.id}: there is no graph to make")
        graph = self._hooks["hal_make_graph"](self.id, mode)
        if graph is None:
            raise GraphHalError(f"plugin {self.plugin_name!r} made no graph for {self.id} in mode {mode!r}")
        return graph

    def capture_session(self, graph: Any, pool: Any = None) -> AbstractContextManager[Any]:
        """Context manager recording the work issued inside into ``graph``, allocating from ``pool``.

        Tensors produced inside hold valid values only after ``replay``, and they live in the pool: the
        next replay of any graph of that pool may overwrite them.
        """
        if isinstance(graph, BreakableGraph):
            return graph.capture(pool)
        # The plugin graph modes are all "full" today; a break point reached inside must know it.
        return tracked_session(self.plugin_capture_session(graph, pool), ActiveCapture(str(self.id), "full"))

    def plugin_capture_session(self, graph: Any, pool: Any) -> AbstractContextManager[Any]:
        """The owning plugin's capture session for one of its own graphs, as is (for graph strategies)."""
        session = self._hooks["hal_capture_session"](graph, pool, self.capture_stream)
        if session is None:
            raise GraphHalError(f"plugin {self.plugin_name!r} does not recognise graph {graph!r} as its own")
        return session

    def replay(self, graph: Any) -> None:
        """Launch ``graph``. Asynchronous where the device queues work."""
        self.replayer(graph)()

    def replayer(self, graph: Any) -> Callable[[], Any]:
        """A zero-argument callable that replays ``graph``: bind it once per graph, call it every step."""
        if isinstance(graph, BreakableGraph):
            return graph.replay
        return lambda: self.replay_plugin_graph(graph)

    def replay_plugin_graph(self, graph: Any) -> None:
        """Replay one of the plugin's own graphs (a full graph, or a breakable graph's segment)."""
        if self._replay(graph) is None:  # "not mine": replaying nothing would hand back stale outputs
            raise GraphHalError(f"plugin {self.plugin_name!r} does not recognise graph {graph!r} as its own")

    def update(self, graph: Any, params: Mapping[str, Any]) -> None:
        """Refresh host-side values baked into ``graph`` before its next replay (``needs_graph_update``).

        ``params`` maps a slot role (``hal.SlotRole.SEQ_LENS``) to the live host values padded to the graph's
        shape. A breakable graph passes them to each of its segments: a segment is a full graph of the device.
        """
        if isinstance(graph, BreakableGraph):
            for segment_graph in graph.segment_graphs:
                self._update(segment_graph, params)
        else:
            self._update(graph, params)

    # --- plumbing ---------------------------------------------------------------------------------------

    def graph_pool(self) -> Any:
        """A new memory pool that several graphs can share."""
        return self._hooks["hal_graph_pool"](self.id)

    def synchronize(self) -> None:
        self._hooks["hal_synchronize"](self.id)

    def memory_stats(self, pool: Any = None) -> MemoryStats:
        stats = self._hooks["hal_memory_stats"](self.id, pool)
        if stats is not None and not isinstance(stats, MemoryStats):
            raise PluginContractError(self.plugin_name, "hal_memory_stats", stats, "a hal.MemoryStats")
        return stats or MemoryStats()
