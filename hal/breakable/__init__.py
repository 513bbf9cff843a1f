"""The breakable strategy: one graph per shape, cut into segments at break points that run eagerly.

Importing this room registers mode ``breakable`` with the facade (``hal.graph_strategies``).
"""

from hal.breakable.break_points import BreakInFullGraphError, BreakPoint, break_graph, break_point
from hal.breakable.break_results import BreakResultMismatchError
from hal.breakable.graph import BreakableGraph, SegmentEndError

__all__ = [
    "BreakInFullGraphError",
    "BreakPoint",
    "BreakResultMismatchError",
    "BreakableGraph",
    "SegmentEndError",
    "break_graph",
    "break_point",
]
