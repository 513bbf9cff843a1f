"""A compile cache directory: a restarted server finds its compiled kernels on disk instead of compiling again.

    DecodeConfig(compiler="inductor", compile_cache_dir="/var/cache/myserver/graphhal")

What a cold start pays before its first captured graph is mostly compiling: Inductor's code generation and
autotuning, and Triton's JIT of every kernel (the model's own and Inductor's). torch keeps the results on
disk (the FX graph, AOTAutograd and Inductor caches under /tmp, Triton's kernel cache under ~/.triton), each
in a directory of its own by default, and can pack what one process compiled into portable artifacts
(``torch.compiler.save_cache_artifacts``) that another process, or another machine, loads back
(``load_cache_artifacts``). One directory holds all of it here:

- ``inductor/`` and ``triton/``: the on-disk caches, pointed there (``TORCHINDUCTOR_CACHE_DIR``,
  ``TRITON_CACHE_DIR``) for the whole process before anything compiles: one directory per process, a second
  one is refused (``CompileCacheConflictError``);
- ``compile-artifacts.bin``: the portable artifacts, written after the capture and loaded before one where
  the on-disk caches are missing, so the file alone (an image, a shared volume) warms a fresh machine too.
  torch 2.7 added them (``portable_artifacts``); before, the on-disk caches alone serve a restart.

- ``forwards/``: compiled forwards stored whole (``hal.compile.stored_compile``: Dynamo's output and
  Inductor's), for ``compiler: inductor`` in mode ``full``; a restart loads its forward and traces nothing.
  Elsewhere Dynamo still traces the model in every process, and what the caches skip is the compiling behind it.

A directory this process cannot write (read-only, another user's) is logged and left out: torch keeps its own
caches and nothing is stored, as without a directory. torch would otherwise fail the first compile with a
``PermissionError`` of its own, out of ``capture()``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

from hal.compile import CompileStore

logger = logging.getLogger(__name__)

ARTIFACTS = "compile-artifacts.bin"
FORWARDS = "forwards"  # compiled forwards stored whole (hal.compile.stored_compile)
# The on-disk caches torch and Triton keep, by the environment variable each reads, and their place here.
ON_DISK_CACHES = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}

_loaded: set[Path] = set()  # directories whose artifacts this process has loaded already
_active: Path | None = None  # the process's one compile cache directory (the caches are process-wide)
_unwritable: set[Path] = set()  # directories found unwritable (and said so) in this process


def portable_artifacts() -> bool:
    """Whether this torch can pack what a process compiled into portable artifacts (torch 2.7 and later)."""
    return hasattr(torch.compiler, "save_cache_artifacts") and hasattr(torch.compiler, "load_cache_artifacts")


class CompileCacheConflictError(ValueError):
    """A second, different compile cache directory was asked for in one process."""


class CompileCache:
    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory).expanduser().resolve()

    @property
    def artifacts(self) -> Path:
        return self.directory / ARTIFACTS

    @property
    def active(self) -> bool:
        """Whether this process's compile caches are here: ``activate()`` pointed them here."""
        return _active == self.directory

    @property
    def forwards(self) -> CompileStore:
        """Where compiled forwards are stored whole for the next process (``hal.compile.stored_compile``)."""
        return CompileStore(self.directory / FORWARDS)

    def activate(self) -> None:
        """Point the on-disk caches here and load the artifacts a previous process saved (once per process).

        An unreadable or incompatible artifact file (another torch version) is logged and skipped: the
        capture then compiles cold and saves fresh artifacts over it. A directory this process cannot write
        is logged (once) and not used: the caches stay torch's own, and ``active`` is False.
        """
        global _active
        if _active is not None and _active != self.directory:
            # Inductor and Triton read these variables on every compile, for the whole process: a second
            # directory would redirect the first runner's later compiles too.
            raise CompileCacheConflictError(
                f"compile_cache_dir {str(self.directory)!r} differs from {str(_active)!r}, which this process uses "
                "already: the compile caches are process-wide, so every runner of a process must name the same one"
            )
        if self.directory in _unwritable:
            return  # said so when it was found
        if _active is None:
            problem = self._unwritable()
            if problem is not None:  # a cache must never stop a server: compile with torch's own caches instead
                _unwritable.add(self.directory)
                logger.warning("graphhal: compile cache directory %s unusable (%s); compiling without it", self.directory, problem)
                return
            previous = {variable: os.environ.get(variable) for variable in ON_DISK_CACHES}
            for variable, value in previous.items():
                if value is not None and value != str(self.directory / ON_DISK_CACHES[variable]) and not _torchs_own(variable, value, previous):
                    logger.warning("graphhal: compile_cache_dir overrides %s=%s for this process", variable, value)
        for variable, name in ON_DISK_CACHES.items():
            os.environ[variable] = str(self.directory / name)
        _active = self.directory
        if self.directory in _loaded or not self.artifacts.is_file() or self._holds_on_disk_caches():
            return
        if not portable_artifacts():
            logger.warning("graphhal: %s is ignored: this torch (%s) cannot load compile artifacts", self.artifacts, torch.__version__)
            return
        try:
            info = torch.compiler.load_cache_artifacts(self.artifacts.read_bytes())
        except Exception as exc:  # a cache must never stop a server: compile cold instead
            logger.warning("graphhal: could not load compile artifacts from %s (%s: %s); compiling cold", self.artifacts, type(exc).__name__, exc)
            return
        _loaded.add(self.directory)
        logger.info("graphhal: loaded compile artifacts from %s: %s", self.artifacts, info)

    def _unwritable(self) -> str | None:
        """Why this process cannot keep its caches here, or None. torch creates its folders and files as it
        compiles and fails at the first it cannot write, so each folder is made and written once now."""
        for folder in (self.directory, *(self.directory / name for name in ON_DISK_CACHES.values())):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryFile(dir=folder):
                    pass
            except OSError as exc:
                return f"{type(exc).__name__}: {exc}"
        return None

    def _holds_on_disk_caches(self) -> bool:
        """Whether Inductor's on-disk cache is here already (a restart on this machine, or the whole directory
        copied): then the artifacts hold nothing it lacks, and loading them (0.2 s on an H200 host) is skipped.
        They serve a directory that has only them, or whose caches were cleared."""
        inductor = self.directory / ON_DISK_CACHES["TORCHINDUCTOR_CACHE_DIR"]
        return inductor.is_dir() and any(inductor.iterdir())

    def save(self) -> bool:
        """Write what this process compiled as portable artifacts (replacing the file atomically); whether any.
        Nothing where the caches are not here (``active``): an unwritable directory was reported already."""
        if not self.active:
            return False
        if not portable_artifacts():
            return False  # nothing to write: the on-disk caches keep what this process compiled
        try:
            packed = torch.compiler.save_cache_artifacts()
            if packed is None:
                return False
            data, _ = packed
            with tempfile.NamedTemporaryFile(dir=self.directory, prefix=".artifacts-", delete=False) as handle:
                handle.write(data)
            os.chmod(handle.name, 0o644)  # readable wherever the directory is shared, like the caches beside it
            os.replace(handle.name, self.artifacts)  # a concurrent reader sees the old file or the new, never half
        except Exception as exc:  # the graphs are captured: a cache that cannot be written must not undo that
            logger.warning("graphhal: could not save compile artifacts to %s (%s: %s)", self.artifacts, type(exc).__name__, exc)
            return False
        _loaded.add(self.directory)  # what it holds is in this process's caches already
        return True


def _torchs_own(variable: str, value: str, environment: dict[str, str | None]) -> bool:
    """Whether ``value`` is what torch itself writes into the environment, not a user's choice: importing
    ``torch._dynamo`` sets TORCHINDUCTOR_CACHE_DIR to torch's default (``cache_dir()``), and Inductor's first
    Triton kernel sets TRITON_CACHE_DIR to ``<that directory>/triton/<device index>``. Warning about those
    would warn on every start (a user who set the default by hand is not told: the values are the same)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # a torch without it: any value may be the user's
        return False
    inductor = os.path.abspath(environment.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir())
    if variable == "TORCHINDUCTOR_CACHE_DIR":
        return os.path.abspath(value) == os.path.abspath(default_cache_dir())
    triton = Path(value)
    return triton.parent == Path(inductor) / "triton" and triton.name.isdigit()
