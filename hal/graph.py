"""What every graph a ``Device`` makes is to the code above it: capture, replay, update, drop.

A device's own graphs (``hal_make_graph``) are wrapped in ``hal.device.PluginGraph``; the strategies hal builds
on them (``hal.breakable``) implement the same four calls. The facade and the runners only ever call these, so a
strategy is added without the facade knowing its class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import Any, Mapping


class DeviceGraph(ABC):
    """One captured (or capturable) graph of one shape."""

    mode: str

    @abstractmethod
    def capture(self, pool: Any) -> AbstractContextManager[Any]:
        """Context manager recording the work issued inside, allocating from ``pool``.

        Tensors produced inside live in the pool and hold valid values only after ``replay`` (where capture
        only records); the next replay of any graph of that pool may overwrite them.
        """

    @abstractmethod
    def replay(self) -> None:
        """Launch the recorded work. Asynchronous where the device queues work."""

    @abstractmethod
    def update(self, params: Mapping[str, Any]) -> None:
        """Refresh host-side values baked into the graph before its next replay (``needs_graph_update``)."""

    @abstractmethod
    def drop(self) -> None:
        """Forget what was captured; the memory it held goes back to its pool."""
