"""The graph modes, named once: what a runner config asks for and what a device offers."""

from __future__ import annotations

from enum import Enum


class GraphMode(str, Enum):
    """How a step is captured. A ``str`` enum: configs, JSON and plugins keep using the plain names.

    FULL       one device graph per shape: the device's own graphs (``hal_graph_modes``)
    BREAKABLE  one graph per shape cut into segments at break points, which run eagerly between them
    PIECEWISE  torch.compile splits the forward at splitting ops; each piece between them is captured
    DISABLED   no graph: the step runs eagerly through the same runner API
    """

    FULL = "full"
    BREAKABLE = "breakable"
    PIECEWISE = "piecewise"
    DISABLED = "disabled"

    # Printed and formatted as the plain name, the way configs and messages spell it.
    __str__ = str.__str__
    __format__ = str.__format__
    __hash__ = str.__hash__  # a GraphMode and its plain name are one dict key
