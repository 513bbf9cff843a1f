"""Triton's per-process cache key, hashed in the background while the server loads its weights.

The first Triton kernel a process launches, compiled or found in Triton's on-disk cache, first computes
``triton_key()``: a hash of Triton's own sources and of its 500 MB shared library, about 0.3 s on an H200
host, paid again by every fresh process, so inside the first capture of a restarted server. The result is
cached for the process, and hashing releases the GIL: started when the device is made (before a server loads
its model), it is done by the time the capture needs it.
"""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger(__name__)

_started = False


def start_hashing_triton_key() -> None:
    """Compute Triton's cache key on a daemon thread, once per process; nothing when Triton is absent."""
    global _started
    if _started:
        return
    _started = True
    try:  # where the function lives moved between Triton releases
        from triton.runtime.cache import triton_key  # type: ignore[attr-defined]
    except ImportError:
        try:
            from triton.compiler.compiler import triton_key  # type: ignore[attr-defined,no-redef]
        except ImportError:
            return
    threading.Thread(target=_hash, args=(triton_key,), name="graphhal-triton-key", daemon=True).start()


def _hash(triton_key) -> None:  # type: ignore[no-untyped-def]
    try:
        triton_key()  # functools-cached inside Triton: the first kernel finds it computed
    except Exception as exc:  # only a head start: the first kernel computes it itself
        logger.debug("graphhal: hashing Triton's cache key in the background failed: %s", exc)
