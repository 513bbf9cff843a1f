"""One capturable piece of a piecewise graph: a graph per token-count bucket, the compiled piece otherwise."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from hal.errors import StaticAddressError
from hal.pool_aliases import non_owning_outputs

if TYPE_CHECKING:
    from hal.device import Device


@dataclass
class PieceCaptures:
    """What every piece of one piecewise compile shares: device, pool, the buckets to capture, warm-ups."""

    device: "Device"
    pool: Any
    buckets: frozenset[int]
    warmup_runs: int = 1
    enabled: bool = True  # False: pieces run compiled, without graphs (eager fallback, breakable compile)


@dataclass
class _PieceGraph:
    graph: Any
    replay: Callable[[], Any]
    outputs: Any
    addresses: list[tuple[int, int]]  # (argument index, data_ptr) of every tensor argument at capture
    addresses_checked: bool = False


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
    compiled piece directly, as does every call when capture is disabled.
    """

    def __init__(self, name: str, index: int, compiled: Callable[..., Any], shape_key: ShapeKey | None, captures: PieceCaptures, arg_names: Sequence[str]) -> None:
        self.name = name
        self.index = index
        self.compiled = compiled
        self.shape_key = shape_key
        self.captures = captures
        self.arg_names = tuple(arg_names)
        self.graphs: dict[int, _PieceGraph] = {}
        # Set on the piece whose outputs are the forward's outputs: it keeps only non-owning aliases of
        # them, so each bucket's outputs stop holding pool memory once captured (see hal.pool_aliases).
        # Other pieces' outputs feed later pieces of the same capture and must stay allocated.
        self.outputs_leave_the_graph = False

    def __call__(self, *args: Any) -> Any:
        captures = self.captures
        if not captures.enabled:
            return self.compiled(*args)
        bucket = self.shape_key(args) if self.shape_key is not None else None
        if bucket is None or bucket not in captures.buckets:
            return self.compiled(*args)
        captured = self.graphs.get(bucket)
        if captured is None:
            return self._capture(bucket, args)
        if not captured.addresses_checked:
            self._check_addresses(bucket, captured, args)
        captured.replay()
        return captured.outputs

    def _capture(self, bucket: int, args: Sequence[Any]) -> Any:
        device = self.captures.device
        for _ in range(self.captures.warmup_runs):
            self.compiled(*args)
        device.synchronize()
        graph = device.make_graph("full")
        with device.capture_session(graph, self.captures.pool):
            outputs = self.compiled(*args)
        replay = device.replayer(graph)
        if not device.capture_executes_work:
            # Only recorded: run it once, so the splitting op after this piece computes on real values.
            replay()
        addresses = [(i, a.data_ptr()) for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        if self.outputs_leave_the_graph:
            outputs = non_owning_outputs(outputs)
        self.graphs[bucket] = _PieceGraph(graph, replay, outputs, addresses)
        return outputs

    def _check_addresses(self, bucket: int, captured: _PieceGraph, args: Sequence[Any]) -> None:
        moved = [self.arg_names[i] for i, address in captured.addresses if args[i].data_ptr() != address]
        if moved:
            raise StaticAddressError(
                f"piece {self.index} ({self.name}) of the piecewise graph, bucket {bucket}: input(s) "
                f"{', '.join(moved)} are not at the addresses the piece was captured with, so its graph would "
                "read stale memory. A splitting op must write into an output allocated by the piece before it "
                "(not return a fresh tensor), and the runner's inputs and weights must stay in place."
            )
        captured.addresses_checked = True

    def drop_graphs(self) -> None:
        self.graphs.clear()
