"""Rebuild the shipped lm-eval task data (``cloze.jsonl``, ``complete.jsonl``) from the bundled
calibration prose (passages of the Python Language Reference, PSF License 2.0), so a converted
model can be scored offline. Run by maintainers, not at evaluation time:

    python -m converter.lm_eval_tasks.build

Each item is one sentence of the prose with its last word taken away: ``transmla_cloze`` asks
which of four words ends it (the other three end other sentences), ``transmla_complete`` asks
the model to write it. The prose is also in the default calibration set: a conversion
calibrated on it has seen these sentences (the benchmarks calibrate on Shakespeare instead).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from converter.calibration.text import BUNDLED

OUT = Path(__file__).resolve().parent
CLOZE_FILE = OUT / "cloze.jsonl"
COMPLETE_FILE = OUT / "complete.jsonl"
CLOZE_ITEMS = 64
COMPLETE_ITEMS = 32
CHOICES = 4
SEED = 27
_LAST_WORD = re.compile(r"^(?P<context>.*\S)\s+(?P<word>[a-z]{4,})\.$")


def sentences(text: str) -> list[tuple[str, str]]:
    """(context, last word) of each plain-prose sentence of 12 to 40 words that ends in a
    lower-case word of four letters or more: no grammar rules, code or quoted names."""
    out = []
    for paragraph in text.split("\n\n"):
        if paragraph.startswith(" ") or "::=" in paragraph:
            continue
        flat = " ".join(paragraph.split())
        for sentence in re.split(r"(?<=\.)\s+(?=[A-Z])", flat):
            match = _LAST_WORD.match(sentence)
            if match and 12 <= len(sentence.split()) <= 40 and '"' not in sentence:
                out.append((match["context"], match["word"]))
    return out


def build() -> tuple[list[dict], list[dict]]:
    """The cloze and completion items, drawn from distinct sentences with a fixed seed."""
    rng = random.Random(SEED)
    pool = sentences((BUNDLED / "prose.txt").read_text(encoding="utf-8"))
    rng.shuffle(pool)
    cloze_part, complete_part = pool[:CLOZE_ITEMS], pool[CLOZE_ITEMS : CLOZE_ITEMS + COMPLETE_ITEMS]
    endings = sorted({word for _, word in cloze_part})
    cloze = []
    for context, word in cloze_part:
        choices = rng.sample([w for w in endings if w != word], CHOICES - 1) + [word]
        rng.shuffle(choices)
        cloze.append({"context": context, "choices": choices, "answer": choices.index(word)})
    complete = [{"context": context, "target": word} for context, word in complete_part]
    return cloze, complete


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    cloze, complete = build()
    _write(CLOZE_FILE, cloze)
    _write(COMPLETE_FILE, complete)
    print(f"{len(cloze)} cloze and {len(complete)} completion items in {OUT}")


if __name__ == "__main__":
    main()
