"""Finding torch_npu without letting a missing, broken or too old install take graphhal down.

Supported torch_npu: 2.6 and newer (``MIN_TORCH_NPU``). The plugin follows the NPUGraph API as torch_npu 2.14
documents it (``torch_npu/npu/graphs.py``): ``NPUGraph``, ``torch.npu.graph(npu_graph, pool=, stream=,
auto_dispatch_capture=, capture_error_mode=)``, ``NPUGraph.update(cpu_update_input=...)``, the task-group
functions ``graph_task_group_begin/end`` and ``graph_task_update_begin/end``, and ``torch.npu.ExternalEvent``.
An older torch_npu is refused with ``TorchNpuVersionError``, naming the version found and the minimum.

Importing torch_npu is guarded: without Ascend's CANN libraries it raises at import (and an installed
torch_npu breaks ``import torch`` itself unless ``TORCH_DEVICE_BACKEND_AUTOLOAD=0``), so it is probed with
``find_spec`` first and imported inside ``try``. Nothing here runs at plugin import.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from hal import DeviceUnavailableError

logger = logging.getLogger(__name__)

MIN_TORCH_NPU = (2, 6)
FOLLOWED_TORCH_NPU_API = "2.14"

# What the plugin calls on torch.npu (torch_npu.npu). A torch_npu new enough by its version string but
# lacking one of these is refused too: the message then names what is missing.
_REQUIRED_NPU_API = (
    "NPUGraph",
    "graph",
    "graph_pool_handle",
    "ExternalEvent",
    "Event",
    "Stream",
    "stream",
    "current_stream",
    "graph_task_group_begin",
    "graph_task_group_end",
    "graph_task_update_begin",
    "graph_task_update_end",
    "is_current_stream_capturing",
    "synchronize",
)


class TorchNpuVersionError(DeviceUnavailableError):
    """torch_npu is installed and imports, but is older than graphhal's npu device supports."""


@dataclass(eq=False)
class TorchNpu:
    """An imported, supported torch_npu: the module, its ``torch.npu`` namespace and the plugin's streams."""

    module: ModuleType
    npu: Any  # torch.npu, which torch_npu installs as torch_npu.npu
    version: str
    _streams: dict[tuple[str, int], Any] = field(default_factory=dict)

    def capture_stream(self, index: int) -> Any:
        """The side stream every capture on device ``index`` runs on (never the default stream)."""
        return self._stream("capture", index)

    def update_stream(self, index: int) -> Any:
        """The stream the plugin issues explicit updates on for device ``index``."""
        return self._stream("update", index)

    def _stream(self, purpose: str, index: int) -> Any:
        if (purpose, index) not in self._streams:
            self._streams[purpose, index] = self.npu.Stream(device=index)
        return self._streams[purpose, index]


_runtime: TorchNpu | None = None
# Import failures by the file that failed: a broken install is not retried on every availability query.
_failed_imports: dict[str, str] = {}


def find_torch_npu() -> tuple[ModuleType | None, str]:
    """The torch_npu module, or None and why not. Never raises."""
    module = sys.modules.get("torch_npu")
    if module is not None:
        return module, ""
    try:
        spec = importlib.util.find_spec("torch_npu")
    except (ImportError, ValueError) as exc:  # ValueError: a torch_npu left in sys.modules as None
        return None, f"torch_npu cannot be located: {exc}"
    if spec is None:
        return None, "torch_npu is not installed"
    origin = str(spec.origin)
    if origin in _failed_imports:
        return None, _failed_imports[origin]
    try:
        return importlib.import_module("torch_npu"), ""
    except Exception as exc:  # without CANN, the import fails with all kinds of errors
        reason = f"torch_npu is installed ({origin}) but fails to import: {type(exc).__name__}: {exc}"
        _failed_imports[origin] = reason
        logger.debug("graphhal: %s", reason)
        return None, reason


def torch_npu_runtime() -> TorchNpu:
    """The usable torch_npu, checked once per module object; raises ``DeviceUnavailableError`` saying why not."""
    global _runtime
    module, reason = find_torch_npu()
    if module is None:
        raise DeviceUnavailableError(f"the npu device needs torch_npu: {reason}")
    if _runtime is not None and _runtime.module is module:
        return _runtime
    version = str(getattr(module, "__version__", "unknown"))
    check_version(version)
    npu = getattr(module, "npu", None)
    missing = [name for name in _REQUIRED_NPU_API if not hasattr(npu, name)]
    if not hasattr(getattr(npu, "NPUGraph", None), "update"):
        missing.append("NPUGraph.update")
    if missing:
        raise TorchNpuVersionError(
            f"torch_npu {version} lacks {', '.join(f'torch.npu.{name}' for name in missing)}, which graphhal's npu "
            f"device needs (it follows the NPUGraph API of torch_npu {FOLLOWED_TORCH_NPU_API}); upgrade torch_npu"
        )
    _runtime = TorchNpu(module, npu, version)
    return _runtime


def check_version(version: str) -> None:
    """Raise ``TorchNpuVersionError`` unless ``version`` (torch_npu.__version__) is at least ``MIN_TORCH_NPU``."""
    minimum = ".".join(map(str, MIN_TORCH_NPU))
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise TorchNpuVersionError(
            f"torch_npu reports version {version!r}, which graphhal cannot read; the npu device needs torch_npu "
            f">= {minimum}"
        )
    if (int(match[1]), int(match[2])) < MIN_TORCH_NPU:
        raise TorchNpuVersionError(
            f"torch_npu {version} is too old: graphhal's npu device needs torch_npu >= {minimum} (NPUGraph.update "
            "with auto_dispatch_capture, graph task groups, ExternalEvent); upgrade torch_npu"
        )
