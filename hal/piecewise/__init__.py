"""The piecewise strategy: torch.compile splits a forward at splitting ops; each piece is captured per bucket.

Importing this room registers mode ``piecewise`` with the facade (``hal.graph_strategies``).
"""

from hal.piecewise.backend import PIECE_COMPILERS, PiecewiseBackend
from hal.piecewise.piece import PiecewisePiece
from hal.piecewise.splitting_ops import (
    SplittingOpError,
    register_splitting_op,
    registered_splitting_ops,
    unregister_splitting_op,
)

__all__ = [
    "PIECE_COMPILERS",
    "PiecewiseBackend",
    "PiecewisePiece",
    "SplittingOpError",
    "register_splitting_op",
    "registered_splitting_ops",
    "unregister_splitting_op",
]
