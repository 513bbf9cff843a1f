"""Installing a distribution into a temporary site directory, as pip would, so entry points are real."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import hal


def install_distribution(site: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """Lay out an installed distribution the way pip does: its modules plus a .dist-info with entry_points.txt
    naming them under graphhal's entry-point group."""
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{hal.ENTRY_POINT_GROUP}]\n{lines}\n")
    for module, source in modules.items():
        (site / f"{module}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory on sys.path that importlib.metadata scans for distributions, like site-packages."""
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path
