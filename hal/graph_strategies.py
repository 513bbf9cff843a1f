"""Graph strategies hal builds on a device's full graphs, by mode: the facade looks them up here.

A strategy registers itself when its room is imported (``hal/__init__`` imports them all), so the facade,
one floor below, never imports a strategy: it asks this table which modes exist beyond the device's own and
how to make a graph of one.
"""

from __future__ import annotations

from typing import Any, Callable

from hal.graph import DeviceGraph

# mode -> make(device) -> an empty graph of that mode. The device is typed loosely on purpose: this table
# sits below the facade that reads it.
_strategies: dict[str, Callable[[Any], DeviceGraph]] = {}


def register_strategy(mode: str, make: Callable[[Any], DeviceGraph]) -> None:
    """Offer ``mode`` on every device with full graphs; ``make`` builds an empty graph of it for a device
    (or raises ``UnsupportedModeError`` saying why the mode has no single graph object)."""
    _strategies[mode] = make


def strategy_modes() -> tuple[str, ...]:
    return tuple(_strategies)


def strategy(mode: str) -> Callable[[Any], DeviceGraph] | None:
    return _strategies.get(mode)
