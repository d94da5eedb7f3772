"""Where calibration text comes from: a file or folder, a JSONL field, a hub dataset (through
``datasets``, for users with hub access), or the small set bundled with the package, so the
default works offline. ``chat=True`` renders the text as dialogue turns with the source's chat
template, for instruct models that mostly see templated text when served."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from converter.errors import ConversionError

log = logging.getLogger(__name__)
BUNDLED = Path(__file__).resolve().parent / "data"
TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")


def read_calibration_text(path: str | Path) -> tuple[str, list[str]]:
    """UTF-8 text of a file, or of every text file under a folder (sorted, for reproducibility)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ConversionError(f"calibration folder {path} holds no {TEXT_SUFFIXES} files")
    elif path.is_file():
        files = [path]
    else:
        raise ConversionError(f"calibration text {path} does not exist")
    parts = []
    for f in files:
        try:
            parts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ConversionError(f"calibration file {f} is not UTF-8 text ({exc.reason})") from exc
    return "\n\n".join(parts), [str(f) for f in files]


@dataclass(frozen=True)
class CalibrationInput:
    """Where the text comes from (the --calib-* flags; TextOptions holds them as given)."""

    text: str | None = None  # file or folder
    jsonl: str | None = None
    field: str = "text"  # JSON field / dataset column
    dataset: str | None = None  # NAME[:split]
    chat: bool = False

    @property
    def named(self) -> bool:
        """Whether the user named a text (False: the bundled set, the default)."""
        return any(x is not None for x in (self.text, self.jsonl, self.dataset))

    def describe(self) -> str:
        if self.text:
            return f"text {self.text}"
        if self.jsonl:
            return f"jsonl {self.jsonl} field {self.field!r}"
        if self.dataset:
            return f"dataset {self.dataset}"
        return "the bundled calibration set (prose, code, dialogue)"


@dataclass(kw_only=True)
class TextOptions:
    """The text options convert and heal share (flags --calib-*, made by
    commands/options.py add_text_options); the defaults are CalibrationInput's."""

    calib_text: str | None = CalibrationInput.text
    calib_jsonl: str | None = CalibrationInput.jsonl
    calib_field: str = CalibrationInput.field
    calib_dataset: str | None = CalibrationInput.dataset
    calib_chat: bool = CalibrationInput.chat

    @property
    def text_input(self) -> CalibrationInput:
        return CalibrationInput(
            self.calib_text, self.calib_jsonl, self.calib_field, self.calib_dataset, self.calib_chat
        )


def _jsonl_documents(path: str, field: str) -> list[str]:
    docs = []
    p = Path(path)
    if not p.is_file():
        raise ConversionError(f"--calib-jsonl {path} does not exist")
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)[field]
        except json.JSONDecodeError as exc:
            raise ConversionError(f"{path} line {n} is not valid JSON ({exc.msg})") from exc
        except (KeyError, TypeError) as exc:
            raise ConversionError(
                f"{path} line {n} has no field {field!r} (choose it with --calib-field)"
            ) from exc
        if isinstance(value, str) and value.strip():
            docs.append(value)
    return docs


def _dataset_documents(spec: str, field: str) -> list[str]:
    try:
        import datasets
    except ImportError as exc:
        raise ConversionError(
            "--calib-dataset needs the `datasets` package (pip install datasets)"
        ) from exc
    name, _, split = spec.partition(":")
    try:
        data = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # datasets raises many types for a bad name or no network
        raise ConversionError(f"could not load dataset {spec}: {exc}") from exc
    if field not in data.column_names:
        raise ConversionError(
            f"dataset {spec} has no column {field!r} (columns: "
            f"{data.column_names}); choose one with --calib-field"
        )
    return [t for t in data[field] if isinstance(t, str) and t.strip()]


def _as_chat(tokenizer, documents: list[str]) -> list[str]:
    """Render paragraphs as user/assistant turns with the model's own chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConversionError("--calib-chat needs a chat template in the source tokenizer")
    paragraphs = [p.strip() for d in documents for p in d.split("\n\n") if p.strip()]
    rendered = []
    for i in range(0, len(paragraphs) - 1, 2):
        messages = [
            {"role": "user", "content": paragraphs[i]},
            {"role": "assistant", "content": paragraphs[i + 1]},
        ]
        rendered.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return rendered


def load_documents(spec: CalibrationInput, tokenizer) -> tuple[list[str], list[str]]:
    """(documents, source names) for the chosen calibration input."""
    if sum(x is not None for x in (spec.text, spec.jsonl, spec.dataset)) > 1:
        raise ConversionError("pass only one of --calib-text, --calib-jsonl, --calib-dataset")
    if spec.jsonl:
        docs, names = _jsonl_documents(spec.jsonl, spec.field), [Path(spec.jsonl).name]
    elif spec.dataset:
        docs, names = _dataset_documents(spec.dataset, spec.field), [spec.dataset]
    else:
        text, files = read_calibration_text(spec.text or BUNDLED)
        docs, names = [text], [Path(f).name for f in files]
    if not docs:
        raise ConversionError(f"no calibration text found in {spec.describe()}")
    if spec.chat:
        docs = _as_chat(tokenizer, docs)
    return docs, names
