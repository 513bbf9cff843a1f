"""One capturable piece of a piecewise graph: a graph per token-count bucket, the compiled piece otherwise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from hal.device import Device
from hal.graph_per_key import AfterWarmup, GraphPerKey


@dataclass
class PieceCaptures:
    """What every piece of one piecewise compile shares: device, pool, the buckets to capture, warm-ups."""

    device: Device
    pool: Any
    buckets: frozenset[int]
    warmup_runs: int = 1
    after_warmup: AfterWarmup | None = None  # see hal.graph_per_key.GraphPerKey


@dataclass
class ShapeKey:
    """Where a piece's runtime token count is read: an int argument, one dim of a tensor argument, or a
    constant (a static compile, made for one bucket)."""

    index: int = 0
    dim: int | None = None
    constant: int | None = None

    def __call__(self, args: Sequence[Any]) -> int:
        if self.constant is not None:
            return self.constant
        value = args[self.index]
        return int(value if self.dim is None else value.shape[self.dim])


class PiecewisePiece:
    """Calls to one piece: the first call at a bucket warms up and captures, later calls replay.

    The split graph calls this in place of the piece's submodule. Token counts that are not buckets run the
    compiled piece directly.
    """

    def __init__(
        self,
        name: str,
        index: int,
        compiled: Callable[..., Any],
        shape_key: ShapeKey | None,
        captures: PieceCaptures,
        arg_names: Sequence[str],
        *,
        outputs_leave: bool = False,
    ) -> None:
        self.name = name
        self.index = index
        self.compiled = compiled
        self.shape_key = shape_key
        self.buckets = captures.buckets
        self.arg_names = tuple(arg_names)
        # The piece whose outputs are the forward's outputs keeps only non-owning aliases of them, so each
        # bucket's outputs stop holding pool memory once captured (see hal.pool_aliases). Other pieces'
        # outputs feed later pieces of the same capture and stay allocated until the whole forward is
        # captured at that bucket (``PiecewiseBackend.let_outputs_leave``).
        self.graphs = GraphPerKey(
            captures.device,
            captures.pool,
            warmup_runs=captures.warmup_runs,
            outputs_leave=outputs_leave,
            replay_after_capture=True,  # the splitting op after this piece reads its outputs right away
            after_warmup=captures.after_warmup,
            what=f"piece {index}",
        )

    def __call__(self, *args: Any) -> Any:
        bucket = self.shape_key(args) if self.shape_key is not None else None
        if bucket is None or bucket not in self.buckets:
            return self.compiled(*args)
        captured = self.graphs.get(bucket)
        if captured is None:
            return self.graphs.capture(bucket, self.compiled, *args).outputs
        return captured.replay_with(args, lambda moved: self._describe_moved(bucket, moved))

    def _describe_moved(self, bucket: int, moved: list[int]) -> str:
        return (
            f"piece {self.index} ({self.name}) of the piecewise graph, bucket {bucket}: input(s) "
            f"{', '.join(self.arg_names[i] for i in moved)} are not at the addresses the piece was captured with, so "
            "its graph would read stale memory. A splitting op must write into an output allocated by the piece "
            "before it (not return a fresh tensor), and the runner's inputs and weights must stay in place."
        )

    def let_outputs_leave(self, bucket: int) -> None:
        if bucket in self.graphs:
            self.graphs.let_outputs_leave(bucket)

    def drop_graphs(self, pool: Any) -> None:
        self.graphs.drop(pool)
