"""A compile cache directory: a restarted server finds its compiled kernels on disk instead of compiling again.

    DecodeConfig(compiler="inductor", compile_cache_dir="/var/cache/myserver/graphhal")

What a cold start pays before its first captured graph is mostly compiling: Inductor's code generation and
autotuning, and Triton's JIT of every kernel (the model's own and Inductor's). torch keeps the results on
disk (the FX graph, AOTAutograd and Inductor caches; Triton's kernel cache), each in a directory of its own
under /tmp by default, and can pack what one process compiled into portable artifacts
(``torch.compiler.save_cache_artifacts``) that another process, or another machine, loads back
(``load_cache_artifacts``). One directory holds all of it here:

- ``inductor/`` and ``triton/``: the on-disk caches, pointed there (``TORCHINDUCTOR_CACHE_DIR``,
  ``TRITON_CACHE_DIR``) for the whole process before anything compiles;
- ``compile-artifacts.bin``: the portable artifacts, loaded before the capture and written after it, so a
  directory copied to a fresh machine (an image, a shared volume) warms it as well.

Dynamo still traces the model in every process (its guards are not persisted); what the caches skip is the
compiling behind it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ARTIFACTS = "compile-artifacts.bin"
# The on-disk caches torch and Triton keep, by the environment variable each reads, and their place here.
ON_DISK_CACHES = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}

_loaded: set[Path] = set()  # directories whose artifacts this process has loaded already


class CompileCache:
    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory).expanduser().resolve()

    @property
    def artifacts(self) -> Path:
        return self.directory / ARTIFACTS

    def activate(self) -> None:
        """Point the on-disk caches here and load the artifacts a previous process saved (once per process).

        An unreadable or incompatible artifact file (another torch version) is logged and skipped: the
        capture then compiles cold and saves fresh artifacts over it.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        for variable, name in ON_DISK_CACHES.items():
            os.environ[variable] = str(self.directory / name)
        if self.directory in _loaded or not self.artifacts.is_file():
            return
        try:
            info = torch.compiler.load_cache_artifacts(self.artifacts.read_bytes())
        except Exception as exc:  # a cache must never stop a server: compile cold instead
            logger.warning("graphhal: could not load compile artifacts from %s (%s: %s); compiling cold", self.artifacts, type(exc).__name__, exc)
            return
        _loaded.add(self.directory)
        logger.info("graphhal: loaded compile artifacts from %s: %s", self.artifacts, info)

    def save(self) -> bool:
        """Write what this process compiled as portable artifacts (replacing the file atomically); whether any."""
        packed = torch.compiler.save_cache_artifacts()
        if packed is None:
            return False
        data, _ = packed
        with tempfile.NamedTemporaryFile(dir=self.directory, prefix=".artifacts-", delete=False) as handle:
            handle.write(data)
        os.replace(handle.name, self.artifacts)  # a concurrent reader sees the old file or the new, never half
        _loaded.add(self.directory)  # what it holds is in this process's caches already
        return True
