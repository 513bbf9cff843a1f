"""Cutting a torch.compile FX graph at its splitting ops into pieces and the ops between them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx.passes.split_module import split_module

from hal.splitting_ops import SplittingOpError


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

    Raises ``SplittingOpError`` when a splitting op's return value is used: the op would be handing the next
    piece a fresh tensor instead of writing into one the previous piece allocated.
    """
    partition_of: dict[torch.fx.Node, int] = {}
    split_partitions: dict[int, torch._ops.OpOverload] = {}
    partition = 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "call_function" and node.target in splitting_ops:
            if node.users:
                raise SplittingOpError(
                    f"the compiled graph uses the result of splitting op {node.target} (node {node.name}); a "
                    "splitting op must write into an output argument allocated before it and return nothing"
                )
            partition += 1
            partition_of[node] = partition
            split_partitions[partition] = node.target
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
