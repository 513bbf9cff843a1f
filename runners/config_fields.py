"""The type check every phase config makes of its fields first: a config read from JSON or flags must not
turn ``"off"`` into True or ``true`` into 1."""

from __future__ import annotations

from dataclasses import fields
from typing import Any


def check_field_types(config: Any, field_types: dict[str, type], optional: frozenset[str]) -> None:
    """ValueError naming the field of ``config`` (a phase config dataclass) whose value has the wrong type;
    ``optional`` fields may also be None."""
    phase = config.phase
    for f in fields(config):
        value = getattr(config, f.name)
        expected = field_types.get(f.name)
        if expected is None or (value is None and f.name in optional):
            continue
        if expected is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{phase}: {f.name} must be true or false, got {value!r} ({type(value).__name__})")
        elif expected is int:
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{phase}: {f.name} must be an integer, got {value!r} ({type(value).__name__})")
        elif expected is float:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"{phase}: {f.name} must be a number, got {value!r} ({type(value).__name__})")
        elif expected is str:
            if not isinstance(value, str):
                raise ValueError(f"{phase}: {f.name} must be a string, got {value!r} ({type(value).__name__})")
        elif expected is list:
            if not isinstance(value, (list, tuple)) or not all(isinstance(b, int) and not isinstance(b, bool) for b in value):
                raise ValueError(f"{phase}: {f.name} must be a list of integers, got {value!r}")


def plain(name: str) -> str:
    """A mode or compiler as the plain string configs and JSON hold (``GraphMode.FULL`` -> ``"full"``)."""
    return str.__str__(name)
