"""Finding torch_npu without letting a missing, broken or incomplete install take graphhal down.

Supported: the torch_npu release lines 7.1, 7.2, 7.3 and 26.0 on (Ascend/pytorch tags v7.1.0-pytorch2.6.0,
v7.2.0-pytorch2.7.1 and -pytorch2.6.0, v7.3.0-pytorch2.9.0, v26.0.0-pytorch2.9.0, read against this plugin and
simulated in tests/support/npu_simulator). The plugin decides by what a build has, never by its version
string: a line is not one source tree (7.2's PyTorch 2.6 cut handles ``_npu_paged_attention`` in its capture
dispatch mode, its 2.7.1 and 2.8.0 cuts do not), pre-release tags reuse the release numbers, and source builds
append ``+git<sha>``. So ``torch_npu_runtime`` checks the calls the plugin makes (``REQUIRED_NPU_API``) and
refuses a build lacking any with ``UnsupportedTorchNpuError``, naming what is missing and the version found.
The per-op helpers (workspaces, output shapes) are looked up when a capture meets the op
(``host_length_ops``), so a build without an op the model never calls is not refused for it.

Everything the plugin calls has existed unchanged from 7.1 to master: ``NPUGraph.capture_begin(pool=,
capture_error_mode=)``/``capture_end``/``replay``/``reset``, the task-group functions, ``ExternalEvent``
(torch_npu/npu/graphs.py L62-75 at v7.1.0; streams.py L200). It does not use ``torch.npu.graph`` nor
``NPUGraph.update`` (``capture_session`` says why).

Importing torch_npu is guarded: without Ascend's CANN libraries it raises at import (and an installed
torch_npu breaks ``import torch`` itself unless ``TORCH_DEVICE_BACKEND_AUTOLOAD=0``), so it is probed with
``find_spec`` first and imported inside ``try``. Nothing here runs at plugin import.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

from hal import DeviceUnavailableError

logger = logging.getLogger(__name__)

# What the plugin calls on torch.npu (torch_npu.npu), checked once per torch_npu module.
REQUIRED_NPU_API = (
    "NPUGraph",
    "graph_pool_handle",
    "ExternalEvent",
    "Event",
    "Stream",
    "stream",
    "device",
    "current_stream",
    "graph_task_group_begin",
    "graph_task_group_end",
    "graph_task_update_begin",
    "graph_task_update_end",
    "is_current_stream_capturing",
    "synchronize",
)
_REQUIRED_GRAPH_METHODS = ("capture_begin", "capture_end", "replay", "reset")

# Ends the caching allocator's routing of allocations into a graph pool (NPUCachingAllocator::endAllocateToPool).
# Named _npu_endAllocateCurrentStreamToPool from 7.1 to 26.x (torch_npu/csrc/npu/Module.cpp L327 at v7.1.0,
# L505 at v26.0.0) and _npu_endAllocateToPool on master (L468).
_END_ALLOCATE_TO_POOL = ("_npu_endAllocateToPool", "_npu_endAllocateCurrentStreamToPool")


class UnsupportedTorchNpuError(DeviceUnavailableError):
    """torch_npu is installed and imports, but lacks part of the graph API graphhal's npu device calls."""


@dataclass(eq=False)
class TorchNpu:
    """An imported, supported torch_npu: the module, its ``torch.npu`` namespace and the plugin's streams."""

    module: ModuleType
    npu: Any  # torch.npu, which torch_npu installs as torch_npu.npu
    version: str
    _streams: dict[tuple[str, int], Any] = field(default_factory=dict)

    @property
    def build(self) -> str:
        """How errors name this build: its version, and where it is installed."""
        location = getattr(self.module, "__file__", None)
        return f"torch_npu {self.version}" + (f" ({location})" if location else "")

    def capture_stream(self, index: int) -> Any:
        """The side stream every capture on device ``index`` runs on (never the default stream)."""
        return self._stream("capture", index)

    def update_stream(self, index: int) -> Any:
        """The stream the plugin issues updates on for device ``index``. Made with the device named: torch_npu's
        own update stream is made on whichever device is current when the first NPUGraph() is built
        (graphs.py L92-95 at v7.3.0, L172-175 at v26.0.0), which the plugin never uses."""
        return self._stream("update", index)

    def _stream(self, purpose: str, index: int) -> Any:
        if (purpose, index) not in self._streams:
            self._streams[purpose, index] = self.npu.Stream(device=index)
        return self._streams[purpose, index]

    def op(self, name: str) -> Any:
        """``torch_npu.<name>`` (an op or a helper), or None where this build has none."""
        return getattr(self.module, name, None)

    def end_allocate_to_pool(self) -> Callable[[int, Any], None] | None:
        """torch_npu's binding that ends allocation routing into a pool, or None where it has none."""
        compiled = getattr(self.module, "_C", None)
        for name in _END_ALLOCATE_TO_POOL:
            function = getattr(compiled, name, None)
            if function is not None:
                return function
        return None


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
    missing = missing_api(module)
    if missing:
        raise UnsupportedTorchNpuError(
            f"torch_npu {version} lacks {', '.join(missing)}, which graphhal's npu device calls (supported: the "
            "torch_npu lines 7.1, 7.2, 7.3 and 26.0 on); install a torch_npu of one of those lines"
        )
    _runtime = TorchNpu(module, module.npu, version)
    return _runtime


def missing_api(module: ModuleType) -> list[str]:
    """What of the plugin's required torch.npu API ``module`` (a torch_npu) lacks, as ``torch.npu.<name>``."""
    npu = getattr(module, "npu", None)
    missing = [f"torch.npu.{name}" for name in REQUIRED_NPU_API if not hasattr(npu, name)]
    graph = getattr(npu, "NPUGraph", None)
    if graph is not None:
        missing += [f"torch.npu.NPUGraph.{name}" for name in _REQUIRED_GRAPH_METHODS if not hasattr(graph, name)]
    return missing
