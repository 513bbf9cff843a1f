"""Cutting a torch.compile FX graph at its splitting ops into pieces and the ops between them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx.passes.split_module import split_module



@dataclass(frozen=True)
class SplitGraph:
    """``module`` calls its submodules in order; ``pieces`` name the capturable ones, ``splits`` the ops
    (``ops``: which splitting op each of those submodules calls)."""

    module: torch.fx.GraphModule
    pieces: tuple[str, ...]
    splits: tuple[str, ...]
    ops: dict[str, torch._ops.OpOverload]


def split_at_ops(gm: torch.fx.GraphModule, splitting_ops: frozenset[torch._ops.OpOverload]) -> SplitGraph:
    """Give every splitting-op call a submodule of its own and the runs of nodes between them one each.

    The ops were checked to return nothing (``check_writes_into_output``), so no piece can read a tensor a
    splitting op allocated: everything crossing a split was allocated by a piece, in the pool.
    """
    partition_of: dict[torch.fx.Node, int] = {}
    split_partitions: dict[int, torch._ops.OpOverload] = {}
    partition = 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        op = _as_overload(node, splitting_ops) if node.op == "call_function" else None
        if op is not None:
            partition += 1
            partition_of[node] = partition
            split_partitions[partition] = op
            partition += 1
        else:
            partition_of[node] = partition

    split = split_module(gm, None, lambda node: partition_of[node], keep_original_order=True)
    pieces, splits, ops = [], [], {}
    for node in split.graph.nodes:
        if node.op == "call_module":
            index = int(node.target.rsplit("_", 1)[1])
            if index in split_partitions:
                splits.append(node.target)
                ops[node.target] = split_partitions[index]
            else:
                pieces.append(node.target)
    return SplitGraph(split, tuple(pieces), tuple(splits), ops)


def _as_overload(node: torch.fx.Node, splitting_ops: frozenset[torch._ops.OpOverload]) -> torch._ops.OpOverload | None:
    """The splitting op a call node runs, if any. Dynamo records ``torch.ops.ns.op(...)`` as a call of the
    packet, not of one overload: a packet counts when one of its overloads was registered."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target if target in splitting_ops else None
    if isinstance(target, torch._ops.OpOverloadPacket):
        return next((getattr(target, n) for n in target.overloads() if getattr(target, n) in splitting_ops), None)
    return None
