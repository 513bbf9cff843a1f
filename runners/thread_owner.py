"""One thread runs a runner: the rule that keeps graph outputs from being overwritten under a reader.

A runner's outputs are views into its graph pool that the next ``run`` overwrites (of this runner, or of any
runner sharing the pool). Two threads running one runner therefore hand each other wrong results even when
their calls never overlap: thread A reads its logits while thread B's replay rewrites them. A lock cannot fix
that; only one thread per pool can. So the first thread to run a runner owns it, together with every runner
sharing its pool, and a run from any other thread is an error instead of a silent wrong result. A server that
moves its model loop to another thread says so with ``claim_current_thread``.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from hal import GraphHalError


class RunnerThreadError(GraphHalError, RuntimeError):
    """A runner (or a runner sharing its pool) was run from a thread other than the one that runs it."""


class ThreadOwner:
    """The thread allowed to run the runners of one pool (None until the first run)."""

    def __init__(self) -> None:
        self.ident: int | None = None
        self.thread_name = ""
        self._lock = threading.Lock()

    def check(self, what: str) -> None:
        """Claim ownership on the first call; raise ``RunnerThreadError`` when another thread owns it."""
        ident = threading.get_ident()
        if ident == self.ident:  # the hot path: one comparison
            return
        with self._lock:
            if self.ident is None:
                self._take(ident)
                return
        raise RunnerThreadError(
            f"{what} is run by thread {self.thread_name!r}, and thread {threading.current_thread().name!r} called "
            "run() too. Its outputs are views into graph memory that the next run of any runner sharing its pool "
            "overwrites, so two threads would hand each other wrong results even without overlapping calls. Give "
            "each thread its own runner and pool, or call claim_current_thread() when the model loop moves to "
            "another thread."
        )

    def claim(self) -> None:
        with self._lock:
            self._take(threading.get_ident())

    def adopting(self, earlier: "ThreadOwner | None") -> "ThreadOwner":
        """This owner, taking the thread ``earlier`` (a runner's own, bound before it had a pool) had claimed,
        unless this one already has a thread: a runner claimed before its capture joins its pool's rule."""
        if earlier is not None and earlier is not self and earlier.ident is not None:
            with self._lock:
                if self.ident is None:
                    self.ident, self.thread_name = earlier.ident, earlier.thread_name
        return self

    def _take(self, ident: int) -> None:
        self.ident = ident
        self.thread_name = threading.current_thread().name


# Runners sharing a pool share its owner; the entry goes when the last runner of the pool does.
_owners_by_pool: "weakref.WeakValueDictionary[Any, ThreadOwner]" = weakref.WeakValueDictionary()
_owners_lock = threading.Lock()


def owner_of_pool(pool: Any) -> ThreadOwner:
    """The ``ThreadOwner`` every runner capturing into ``pool`` shares (a new one for no pool)."""
    if pool is None:
        return ThreadOwner()
    try:
        hash(pool)
    except TypeError:  # a device whose pool handles cannot be keyed: the runner is its own owner
        return ThreadOwner()
    with _owners_lock:
        owner = _owners_by_pool.get(pool)
        if owner is None:
            owner = _owners_by_pool[pool] = ThreadOwner()
        return owner
