"""The graph modes and the compilers, named once: what a runner config asks for and what a device offers."""

from __future__ import annotations

from enum import Enum


class _PlainName(str, Enum):
    """A ``str`` enum that configs, JSON and plugins can keep spelling as the plain name."""

    # Printed and formatted as the plain name, the way configs and messages spell it.
    __str__ = str.__str__
    __format__ = str.__format__
    __hash__ = str.__hash__  # a member and its plain name are one dict key


class GraphMode(_PlainName):
    """How a step is captured.

    FULL       one device graph per shape: the device's own graphs (``hal_graph_modes``)
    BREAKABLE  one graph per shape cut into segments at break points, which run eagerly between them
    PIECEWISE  torch.compile splits the forward at splitting ops; each piece between them is captured
    DISABLED   no graph: the step runs eagerly through the same runner API
    AUTO       not a mode any device offers: a runner resolves it, before capturing, to the best of the
               others that the ops its forward reaches allow (``runners.mode_choice``)

    ``Device.modes`` never lists ``AUTO``; use ``GraphMode.device_modes()`` where every mode a device could
    capture is meant.
    """

    FULL = "full"
    BREAKABLE = "breakable"
    PIECEWISE = "piecewise"
    DISABLED = "disabled"
    AUTO = "auto"

    @classmethod
    def device_modes(cls) -> tuple["GraphMode", ...]:
        """Every mode but ``AUTO``: what a device may offer."""
        return tuple(mode for mode in cls if mode is not cls.AUTO)


class Compiler(_PlainName):
    """How a forward is compiled before graphhal captures it (``runners.config.COMPILERS_BY_MODE``).

    NONE      the forward as written, captured as it runs
    EAGER     traced by torch.compile and run as traced (piecewise: each piece between splitting ops)
    INDUCTOR  compiled by Inductor (without its own CUDA graphs: graphhal captures the compiled code)
    """

    NONE = "none"
    EAGER = "eager"
    INDUCTOR = "inductor"
