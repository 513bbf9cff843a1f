"""Errors graphhal raises. Each message says what was wrong and what is allowed instead."""

from __future__ import annotations


class GraphHalError(Exception):
    """Base of every graphhal error."""


class UnknownDeviceError(GraphHalError, LookupError):
    """No plugin serves the requested device type."""


class DeviceUnavailableError(GraphHalError, RuntimeError):
    """A plugin serves the type, but the device is not usable on this machine."""


class UnsupportedModeError(GraphHalError, ValueError):
    """The device cannot capture graphs in the requested mode."""


class CaptureError(GraphHalError, RuntimeError):
    """Capturing one graph failed. The capture was ended; the device remains usable.

    Carries ``bucket``, ``mode`` and ``device`` so a server log says which shape failed where (``bucket`` is
    None for a failure before any bucket, such as ranks disagreeing on what to capture), and, across ranks,
    ``rank``: the rank that failed (None when this rank did, or in a single process).
    """

    def __init__(self, message: str, *, bucket: int | None, mode: str, device: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.bucket = bucket
        self.mode = mode
        self.device = device
        self.rank = rank


class GraphStateError(GraphHalError, RuntimeError):
    """A graph was used out of order: captured twice, or replayed (or updated) before a successful capture.

    Raised by every built-in device's graphs and by hal's strategies; the message names the device and what to
    do (make a new graph per capture; capture before replaying).
    """


class StaticAddressError(GraphHalError, RuntimeError):
    """A tensor a graph reads moved after capture, so replaying would read stale memory."""


class PluginContractError(GraphHalError, TypeError):
    """A device plugin's hook answered with a value of the wrong type."""

    def __init__(self, plugin: str, hook: str, value: object, expected: str) -> None:
        super().__init__(
            f"device plugin {plugin!r}: {hook} returned {value!r} ({type(value).__name__}); expected {expected}. "
            "The plugin breaks graphhal's device contract (hal.hookspecs); fix or uninstall it."
        )
        self.plugin = plugin
        self.hook = hook
