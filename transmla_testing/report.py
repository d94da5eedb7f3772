"""Write one benchmark's section of docs/benchmarks.md, leaving the other sections alone.

Each benchmark owns the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->``.
"""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = (
    "# Benchmarks\n\nEvery section below is written by the script it names, with the "
    "command that produced it. Ratios are measured side by side in one run.\n"
)


def write_section(name: str, markdown: str, doc: Path = DOC) -> None:
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = doc.read_text() if doc.exists() else HEADER
    block = f"{begin}\n{markdown.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def publish(name: str, lines: list[str], write: bool = True) -> None:
    """Print a benchmark's section and, unless ``write`` is False (--no-write), store it."""
    markdown = "\n".join(lines)
    print(markdown)
    if write:
        write_section(name, markdown)


def publish_in(doc: Path, name: str, lines: list[str]) -> None:
    """Print a section and store it in ``doc`` (a docs page other than benchmarks.md, whose
    table a script computes); ``doc`` must already hold its markers."""
    text = doc.read_text()
    if f"<!-- BEGIN {name} -->" not in text:
        raise SystemExit(f"{doc} has no <!-- BEGIN {name} --> marker to write between")
    markdown = "\n".join(lines)
    print(markdown)
    write_section(name, markdown, doc)
