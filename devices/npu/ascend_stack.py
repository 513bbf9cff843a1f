"""What the plugin reads of the Ascend stack under torch_npu: the driver's version and the CANN runtime's symbols.

The second seam between the npu plugin and the machine (``placement`` is the first). On Ascend hardware the
driver (HDK) writes its version to ``<driver>/version.info`` (``Version=25.0.rc1``; the driver's folder is
``/usr/local/Ascend/driver`` unless ``ASCEND_DRIVER_PATH`` names another), the CANN runtime is
``libascendcl.so`` and its operator library ``libopapi.so``, which torch_npu has already loaded from the library
path CANN's ``set_env.sh`` exports.
A simulator of torch_npu has neither and says what to answer with ``probed_by``. Every probe answers None
where it cannot tell (no file, no library): the preflight reports that as unknown, never as a failure.
"""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

DEFAULT_DRIVER_PATH = "/usr/local/Ascend/driver"
ACL_LIBRARY = "libascendcl.so"
OP_API_LIBRARY = "libopapi.so"


@dataclass(frozen=True)
class AscendStack:
    """How to read the stack: ``driver_version()`` (the HDK version string, None where unknown),
    ``runtime_has(symbol)`` and ``op_library_has(symbol)`` (whether CANN's runtime or operator library exports
    ``symbol``; None where it cannot be loaded)."""

    driver_version: Callable[[], str | None]
    runtime_has: Callable[[str], bool | None]
    op_library_has: Callable[[str], bool | None]


def _driver_version() -> str | None:
    path = Path(os.environ.get("ASCEND_DRIVER_PATH", DEFAULT_DRIVER_PATH)) / "version.info"
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip().lower() in ("version", "package_version") and value.strip():
            return value.strip()
    return None


def _exports(library_name: str) -> Callable[[str], bool | None]:
    def has(symbol: str) -> bool | None:
        try:
            library = ctypes.CDLL(library_name)
        except OSError:
            return None
        return hasattr(library, symbol)

    return has


MACHINE = AscendStack(_driver_version, _exports(ACL_LIBRARY), _exports(OP_API_LIBRARY))
_stack: AscendStack | None = None


def current() -> AscendStack:
    """The stack the preflight reads: the machine's, unless a simulator said otherwise."""
    return _stack or MACHINE


@contextmanager
def probed_by(stack: AscendStack) -> Iterator[None]:
    """Within the block, the preflight reads ``stack`` instead of the machine (for simulators of torch_npu)."""
    global _stack
    previous, _stack = _stack, stack
    try:
        yield
    finally:
        _stack = previous
