"""Progress bars for capture loops (tqdm when installed and wanted, silence otherwise)."""

from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], description: str, enabled: bool) -> Iterator[T]:
    if not enabled:
        return iter(items)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but a stripped-down server image may lack it
        return iter(items)
    return iter(tqdm(items, desc=description, unit="graph", leave=False))
