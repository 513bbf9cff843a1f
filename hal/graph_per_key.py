"""Capture per key: one device graph per key (a bucket) around one callable. The one capture primitive.

    graphs = GraphPerKey(device, pool, warmup_runs=1)
    entry = graphs.capture(bucket, forward, **static_inputs)     # warm up, synchronize, capture
    entry.replay()                                               # every later step at that bucket

Runners use it for a whole forward per bucket, the piecewise strategy for each piece per token count (vLLM's
CUDAGraphWrapper serves both levels the same way). What it does, in the order the anchors learned it:

- warm up eagerly before capturing (lazy initialisation, autotuning and allocator growth must not happen
  inside a capture), then synchronize the device, then call ``after_warmup`` with this process's warm-up
  outcome: across ranks, the group barrier at which every rank learns whether all warmed up (SGLang 33356:
  warm-up work still running on one rank when another began capturing);
- capture into the shared pool; on a device that only records, replay once when asked, so the outputs hold
  real values for whatever reads them next (the splitting op after a piece);
- keep only non-owning aliases of the outputs when they leave the graph (``hal.pool_aliases``), so every
  key's outputs reuse the memory the largest key captured;
- remember the addresses of the tensor arguments, to refuse a first replay at other addresses
  (``CapturedGraph.replay_with``, what a piece calls: its arguments are the previous piece's outputs, the
  runner's buffers and the weights; a runner checks its buffers and watched tensors itself before every
  replay, and replays through ``CapturedGraph.replay``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from hal.device import Device
from hal.errors import GraphHalError, StaticAddressError
from hal.graph import DeviceGraph
from hal.graph_modes import GraphMode
from hal.pool_aliases import non_owning_outputs


# after_warmup(key, error, what): called after a key's warm-up with its WarmUpError (or None) and what was
# warmed up ("the forward", "piece 3"); it raises to stop the capture, or returns.
AfterWarmup = Callable[[Any, "BaseException | None", str], None]


class WarmUpError(GraphHalError, RuntimeError):
    """The callable failed in an eager warm-up, before any capture: a model error, not a graph error."""


@dataclass
class CapturedGraph:
    """One key's graph: ``replay`` it, then read ``outputs`` (overwritten by the next replay of the pool)."""

    graph: DeviceGraph
    replay: Callable[[], None]
    outputs: Any
    arg_addresses: tuple[tuple[int, int], ...]  # (index, data_ptr) of every tensor argument at capture
    arguments_checked: bool = False

    def replay_with(self, args: Sequence[Any], describe: Callable[[list[int]], str]) -> Any:
        """Replay after checking, on the first replay, that ``args`` sit where the capture read them;
        ``describe`` turns the indices of moved arguments into the error's text."""
        if not self.arguments_checked:
            moved = [index for index, address in self.arg_addresses if args[index].data_ptr() != address]
            if moved:
                raise StaticAddressError(describe(moved))
            self.arguments_checked = True
        self.replay()
        return self.outputs


class GraphPerKey:
    """The captured graphs of one callable, by key, all in one pool.

    device, pool:         where to capture; keys are captured largest first by the caller, so later,
                          smaller keys reuse the pool memory the first one reserved.
    mode:                 the graph mode of every capture (``full`` or ``breakable``).
    warmup_runs:          eager calls before each capture.
    outputs_leave:        keep only non-owning aliases of the outputs (they leave the graph: the caller
                          consumes them before the next replay); False keeps them alive (a piece whose
                          outputs later pieces of the same capture read).
    replay_after_capture: on a device whose capture only records, replay once right after capturing.
    after_warmup:         ``after_warmup(key, error, what)``, called after the warm-ups (and the synchronize
                          when they succeeded) with the ``WarmUpError`` or None, right before the capture would
                          begin; it raises to stop the capture (every rank agrees there), or returns.
    what:                 what is captured, for ``after_warmup`` and messages ("the forward", "piece 3").
    """

    def __init__(
        self,
        device: Device,
        pool: Any,
        *,
        mode: str = GraphMode.FULL,
        warmup_runs: int = 1,
        outputs_leave: bool = True,
        replay_after_capture: bool = False,
        after_warmup: AfterWarmup | None = None,
        what: str = "the forward",
    ) -> None:
        self.device = device
        self.pool = pool
        self.mode = mode
        self.warmup_runs = warmup_runs
        self.outputs_leave = outputs_leave
        self.replay_after_capture = replay_after_capture
        self.after_warmup = after_warmup
        self.what = what
        self.graphs: dict[Any, CapturedGraph] = {}

    def get(self, key: Any) -> CapturedGraph | None:
        return self.graphs.get(key)

    def __iter__(self) -> Iterator[Any]:
        """The keys captured so far."""
        return iter(self.graphs)

    def __len__(self) -> int:
        return len(self.graphs)

    def __contains__(self, key: Any) -> bool:
        return key in self.graphs

    def capture(self, key: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> CapturedGraph:
        """Warm ``fn`` up, capture one call of it for ``key``, and keep the graph."""
        device = self.device
        error: WarmUpError | None = None
        try:
            for _ in range(self.warmup_runs):
                fn(*args, **kwargs)
            device.synchronize()
        except Exception as exc:
            error = WarmUpError(f"{type(exc).__name__}: {exc}")
            error.__cause__ = exc
        if self.after_warmup is not None:
            self.after_warmup(key, error, self.what)
        if error is not None:
            raise error
        graph = device.make_graph(self.mode)
        with device.capture_session(graph, self.pool):
            outputs = fn(*args, **kwargs)
        replay = device.replayer(graph)
        if self.replay_after_capture and not device.capture_executes_work:
            replay()  # recorded only: run it once, so what reads the outputs next sees real values
        if self.outputs_leave:
            outputs = non_owning_outputs(outputs)
        addresses = tuple((i, a.data_ptr()) for i, a in enumerate(args) if isinstance(a, torch.Tensor))
        entry = self.graphs[key] = CapturedGraph(graph, replay, outputs, addresses)
        return entry

    def let_outputs_leave(self, key: Any) -> None:
        """Keep only non-owning aliases of ``key``'s outputs from now on (``hal.pool_aliases``).

        For outputs that had to stay allocated while the rest of one capture read them (a piece's, which later
        pieces of the same forward read): once that capture is over, the next key's capture may reuse their
        memory, since a replay rewrites them before anything reads them.
        """
        entry = self.graphs[key]
        entry.outputs = non_owning_outputs(entry.outputs)

    def drop(self, pool: Any = None) -> None:
        """Forget every graph; later captures go into ``pool`` (a new one: a device may release a pool with
        its last graph, and capturing into the released handle fails)."""
        for entry in self.graphs.values():
            entry.graph.drop()
        self.graphs.clear()
        self.pool = pool
