"""The device registry: a small typed facade over pluggy's plugin manager.

It loads the built-in device plugins and every plugin published under the entry-point group
``graphhal.devices``, keeps one plugin that fails to load from taking the others down, decides which plugin
owns each device type, and hands out one ``Device`` facade per device name. Callers never touch ``pm.hook``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import pluggy

from hal import hookspecs
from hal.default_hooks import OPTIONAL_HOOK_DEFAULTS
from hal.hookspecs import REQUIRED_HOOKS
from hal.device import Device
from hal.device_id import DeviceId
from hal.errors import DeviceUnavailableError, PluginContractError, UnknownDeviceError
from hal.markers import ENTRY_POINT_GROUP, PROJECT_NAME

logger = logging.getLogger(__name__)

# The devices that ship with graphhal, as module names: hal imports no plugin code statically, and a
# built-in device is loaded, checked and isolated exactly like a third-party one.
BUILTIN_DEVICE_PLUGINS = ("devices.cpu", "devices.cuda", "devices.npu")

ALL_HOOKS = tuple(name for name in dir(hookspecs) if name.startswith("hal_"))


class PluginLoadWarning(UserWarning):
    """A device plugin failed to load and was left out; the others keep working."""


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin that failed to load: its name, where it came from, and why."""

    name: str
    origin: str
    reason: str


class DeviceRegistry:
    """Every device plugin found on this machine, and the ``Device`` facades built from them."""

    def __init__(
        self,
        builtin_plugins: Iterable[str] = BUILTIN_DEVICE_PLUGINS,
        *,
        load_entry_points: bool = True,
    ) -> None:
        self._pm = pluggy.PluginManager(PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self.broken: dict[str, BrokenPlugin] = {}
        self._owner_by_type: dict[str, str] = {}  # device type -> plugin name
        self._origin_by_plugin: dict[str, str] = {}
        self._devices: dict[DeviceId, Device] = {}
        self._lock = threading.Lock()

        self._unavailable_reasons: dict[DeviceId, str] = {}  # what hal_is_available raised, per device

        for module_name in builtin_plugins:
            self._load(module_name, "built-in", lambda m=module_name: importlib.import_module(m))
        if load_entry_points:
            self._load_entry_points()
        # Every plugin was checked alone in _load; this catches nothing new but keeps pluggy's guarantee.
        self._pm.check_pending()

    # --- loading ----------------------------------------------------------------------------------------

    def _load_entry_points(self) -> None:
        published: dict[str, str] = {}  # entry-point name -> origin of the one loaded
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = entry_point.dist.name if entry_point.dist else "unknown distribution"
            origin = f"entry point {entry_point.name} = {entry_point.value} ({dist})"
            first = published.setdefault(entry_point.name, origin)
            if first != origin:
                # Plugins are named by their entry point: two under one name cannot both be loaded.
                warnings.warn(
                    f"graphhal device plugin name {entry_point.name!r} is published twice: {first} is loaded, "
                    f"{origin} is left out; rename one of the entry points",
                    PluginLoadWarning,
                    stacklevel=3,
                )
                continue
            self._load(entry_point.name, origin, entry_point.load)

    def register(self, plugin: Any, name: str, origin: str = "registered in code") -> None:
        """Register an already imported plugin object (a module or an instance with hookimpls)."""
        self._load(name, origin, lambda: plugin)

    def _load(self, name: str, origin: str, loader: Callable[[], Any]) -> None:
        if name in self._origin_by_plugin or name in self.broken:
            logger.debug("graphhal: device plugin %r already loaded, skipping %s", name, origin)
            return
        try:
            plugin = loader()
            if inspect.isclass(plugin):  # an entry point may name a class; a plugin is an instance
                plugin = plugin()
            self._pm.register(plugin, name=name)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # any failure of third-party code (sys.exit too) must leave the rest working
            self._mark_broken(name, origin, f"{type(exc).__name__}: {exc}")
            return
        try:
            self._pm.check_pending()
            missing = [hook for hook in REQUIRED_HOOKS if self._impl(name, hook) is None]
            if missing:
                raise TypeError(f"does not implement required hook(s) {', '.join(missing)}")
            device_types = self._impl(name, "hal_device_types")()  # type: ignore[misc]
            if not _is_name_list(device_types):
                raise TypeError(
                    f"hal_device_types returned {device_types!r}; expected a non-empty list of device type names"
                )
            for device_type in device_types:
                self._check_declared_modes(name, device_type)
            self._claim(name, origin, list(device_types))
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            self._pm.unregister(name=name)
            self._mark_broken(name, origin, f"{type(exc).__name__}: {exc}")
            return
        self._origin_by_plugin[name] = origin

    def _check_declared_modes(self, name: str, device_type: str) -> None:
        """A plugin whose hal_graph_modes answers with something other than mode names is left out now, not
        when a runner first asks (a string "full" would read as the modes f, u, l, l). A plugin that cannot
        answer for an absent device may raise: that is reported where modes are asked for."""
        try:
            modes = self._impl(name, "hal_graph_modes")(DeviceId(device_type, None))  # type: ignore[misc]
        except Exception:
            return
        if modes is not None and not (_is_name_list(modes) or modes in ((), [])):
            raise TypeError(f"hal_graph_modes({device_type!r}) returned {modes!r}; expected a list of mode names")

    def _claim(self, name: str, origin: str, device_types: list[str]) -> None:
        for device_type in device_types:
            holder = self._owner_by_type.get(device_type)
            if holder is not None and self._origin_by_plugin[holder] != "built-in":
                raise ValueError(f"device type {device_type!r} is already served by plugin {holder!r}")
        for device_type in device_types:
            holder = self._owner_by_type.get(device_type)
            if holder is not None:
                logger.info("graphhal: plugin %r (%s) replaces built-in %r for %r", name, origin, holder, device_type)
            self._owner_by_type[device_type] = name

    def _mark_broken(self, name: str, origin: str, reason: str) -> None:
        self.broken[name] = BrokenPlugin(name, origin, reason)
        warnings.warn(
            f"graphhal device plugin {name!r} ({origin}) failed to load and is left out: {reason}",
            PluginLoadWarning,
            stacklevel=3,
        )

    def _impl(self, plugin_name: str, hook_name: str) -> Callable[..., Any] | None:
        """The plugin's own implementation of one hook, callable with the spec's arguments in order."""
        plugin = self._pm.get_plugin(plugin_name)
        caller = getattr(self._pm.hook, hook_name)
        spec_args = list(caller.spec.argnames) if caller.spec else []
        for impl in caller.get_hookimpls():
            if impl.plugin is plugin:
                return _call_with_spec_arguments(impl.function, list(impl.argnames), spec_args)
        return None

    # --- queries ----------------------------------------------------------------------------------------

    @property
    def plugin_manager(self) -> pluggy.PluginManager:
        """The underlying pluggy manager, for tools that inspect plugins (not for calling hooks)."""
        return self._pm

    def device_types(self) -> dict[str, str]:
        """Device type -> name of the plugin that serves it."""
        return dict(self._owner_by_type)

    def origin_of(self, plugin_name: str) -> str | None:
        """Where a loaded plugin came from: "built-in", its entry point, or "registered in code"."""
        return self._origin_by_plugin.get(plugin_name)

    def is_available(self, name: str | DeviceId) -> bool:
        """Whether the device can be used here. A plugin that raises while answering counts as unavailable,
        with its error kept for ``unavailable_reason``."""
        device_id = DeviceId.parse(name)
        owner = self._owner_by_type.get(device_id.type)
        if owner is None:
            return False
        try:
            available = self._impl(owner, "hal_is_available")(device_id)  # type: ignore[misc]
        except Exception as exc:
            self._unavailable_reasons[device_id] = f"plugin {owner!r} raised in hal_is_available: {type(exc).__name__}: {exc}"
            return False
        if available is not None and not isinstance(available, bool):  # "no" would read as available
            self._unavailable_reasons[device_id] = str(PluginContractError(owner, "hal_is_available", available, "True or False"))
            return False
        self._unavailable_reasons.pop(device_id, None)
        return bool(available)

    def unavailable_reason(self, name: str | DeviceId) -> str | None:
        """Why ``is_available`` last said no because the plugin failed to answer (None: it answered)."""
        return self._unavailable_reasons.get(DeviceId.parse(name))

    def graph_modes_of(self, device_type: str) -> tuple[str, ...]:
        """The graph modes the plugin serving ``device_type`` declares, whether or not the device is present."""
        owner = self._owner_by_type.get(device_type)
        if owner is None:
            return ()
        return tuple(self._impl(owner, "hal_graph_modes")(DeviceId(device_type, None)) or ())  # type: ignore[misc]

    def stack_checks_of(self, device_type: str) -> list[str]:
        """What the plugin serving ``device_type`` checks of the stack under it (``hal_stack_checks``), one line
        per prerequisite, whether or not the device is present."""
        owner = self._owner_by_type.get(device_type)
        if owner is None:
            return []
        checks = (self._impl(owner, "hal_stack_checks") or OPTIONAL_HOOK_DEFAULTS["hal_stack_checks"])(
            DeviceId(device_type, None)
        )
        if checks is not None and not (_is_name_list(checks) or checks in ((), [])):
            raise PluginContractError(owner, "hal_stack_checks", checks, "a list of strings")
        return list(checks or ())

    def declared_graph_modes(self) -> frozenset[str]:
        """Every graph mode a loaded plugin declares for a type it serves, whether or not the device is present.
        A plugin that cannot answer for an absent device (``graph_modes_of`` raises) adds none."""
        declared: set[str] = set()
        for device_type in self._owner_by_type:
            try:
                declared.update(self.graph_modes_of(device_type))
            except Exception:
                continue
        return frozenset(declared)

    def available_device_types(self) -> list[str]:
        return [t for t in self._owner_by_type if self.is_available(t)]

    def get_device(self, name: "str | DeviceId | Device") -> Device:
        """The ``Device`` facade for ``name`` ("cpu", "cuda:0", ...), created once and then reused."""
        if isinstance(name, Device):
            return name
        device_id = DeviceId.parse(name)
        with self._lock:
            device = self._devices.get(device_id)
            if device is None:
                device = self._devices[device_id] = self._make_device(device_id)
        return device

    def _make_device(self, device_id: DeviceId) -> Device:
        owner = self._owner_by_type.get(device_id.type)
        if owner is None:
            raise UnknownDeviceError(self._describe_unknown(device_id))
        if not self.is_available(device_id):
            reason = self.unavailable_reason(device_id)
            raise DeviceUnavailableError(
                f"device {device_id} is served by plugin {owner!r} but is not available on this machine"
                + (f" ({reason})" if reason else "")
                + f"; available here: {', '.join(self.available_device_types()) or 'none'}"
            )
        hooks = {
            hook: self._impl(owner, hook) or OPTIONAL_HOOK_DEFAULTS[hook]
            for hook in ALL_HOOKS
            if hook != "hal_device_types"
        }
        return Device(device_id, owner, hooks)

    def _describe_unknown(self, device_id: DeviceId) -> str:
        known = ", ".join(sorted(self._owner_by_type)) or "none"
        message = f"no graphhal device plugin serves device type {device_id.type!r}; known device types: {known}"
        if self.broken:
            broken = "; ".join(f"{b.name} ({b.origin}): {b.reason}" for b in self.broken.values())
            message += f"; plugins that failed to load: {broken}"
        return message


def _is_name_list(value: Any) -> bool:
    """A non-empty list (or tuple) of non-empty strings; a bare string is not one."""
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, str) and v for v in value)


def _call_with_spec_arguments(function: Callable[..., Any], impl_args: list[str], spec_args: list[str]):
    """pluggy lets an implementation take a subset of the spec's arguments; adapt it to the full list once."""
    if impl_args == spec_args:
        return function
    positions = [spec_args.index(arg) for arg in impl_args]
    return lambda *args: function(*(args[i] for i in positions))


_default_registry: DeviceRegistry | None = None
_default_lock = threading.Lock()


def default_registry() -> DeviceRegistry:
    """The process-wide registry, discovered on first use."""
    global _default_registry
    with _default_lock:
        if _default_registry is None:
            _default_registry = DeviceRegistry()
        return _default_registry


def reload_plugins() -> DeviceRegistry:
    """Discover plugins again (after installing one at run time); earlier ``Device`` objects stay valid."""
    global _default_registry
    with _default_lock:
        _default_registry = DeviceRegistry()
        return _default_registry


def get_device(name: "str | DeviceId | Device") -> Device:
    """The ``Device`` for ``name`` from the process-wide registry, e.g. ``hal.get_device("cuda:0")``."""
    return default_registry().get_device(name)


def best_available_device(preference: Iterable[str] = ("cuda", "npu")) -> Device:
    """The first available accelerator in ``preference``, else the cpu reference device."""
    registry = default_registry()
    for device_type in preference:
        if device_type in registry.device_types() and registry.is_available(device_type):
            return registry.get_device(device_type)
    return registry.get_device("cpu")
