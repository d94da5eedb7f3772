"""Calibration text: files or folders of UTF-8 text -> fixed-length token chunks."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from converter.errors import ConversionError

log = logging.getLogger(__name__)
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


def token_chunks(tokenizer, text: str | list[str], samples: int, seqlen: int) -> torch.Tensor:
    """Up to ``samples`` non-overlapping chunks of ``seqlen`` tokens spread over the text.

    Each chunk starts with BOS when the tokenizer has one, as the model saw text in training.
    """
    docs = [text] if isinstance(text, str) else text
    ids = [t for d in docs for t in tokenizer(d + "\n\n", add_special_tokens=False)["input_ids"]]
    bos = getattr(tokenizer, "bos_token_id", None)
    body = seqlen - (1 if bos is not None else 0)
    available = len(ids) // body if body > 0 else 0
    if available < 1:
        raise ConversionError(f"calibration text is too short: {len(ids)} tokens found, at least "
                              f"{body} needed for one chunk of --calib-seqlen {seqlen}; pass more "
                              "text or lower --calib-seqlen")
    count = min(samples, available)
    if count < samples:
        log.warning("calibration text gives only %d chunks of %d tokens (asked for %d); "
                    "using %d", available, seqlen, samples, count)
    stride = available // count
    rows = []
    for i in range(count):
        start = i * stride * body
        chunk = ids[start:start + body]
        rows.append(([bos] if bos is not None else []) + chunk)
    return torch.tensor(rows, dtype=torch.long)
