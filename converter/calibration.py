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


def body_length(tokenizer, seqlen: int) -> int:
    """Text tokens per chunk of ``seqlen``: one fewer when a BOS token leads it."""
    return seqlen - (1 if getattr(tokenizer, "bos_token_id", None) is not None else 0)


def bos_chunks(tokenizer, ids: list[int], seqlen: int, count: int, stride: int = 1
               ) -> torch.Tensor:
    """[count, seqlen] token rows; row i is BOS (when the tokenizer has one, as the model saw
    text in training) + the body_length tokens from ``i * stride`` bodies into ``ids``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    body = body_length(tokenizer, seqlen)
    head = [bos] if bos is not None else []
    return torch.tensor([head + ids[i * stride * body:(i * stride + 1) * body]
                         for i in range(count)], dtype=torch.long)


def token_chunks(tokenizer, text: str | list[str], samples: int, seqlen: int) -> torch.Tensor:
    """Up to ``samples`` non-overlapping chunks of ``seqlen`` tokens spread over the text."""
    docs = [text] if isinstance(text, str) else text
    ids = [t for d in docs for t in tokenizer(d + "\n\n", add_special_tokens=False)["input_ids"]]
    body = body_length(tokenizer, seqlen)
    available = len(ids) // body if body > 0 else 0
    if available < 1:
        raise ConversionError(f"calibration text is too short: {len(ids)} tokens found, at least "
                              f"{body} needed for one chunk of --calib-seqlen {seqlen}; pass more "
                              "text or lower --calib-seqlen")
    count = min(samples, available)
    if count < samples:
        log.warning("calibration text gives only %d chunks of %d tokens (asked for %d); "
                    "using %d", available, seqlen, samples, count)
    return bos_chunks(tokenizer, ids, seqlen, count, stride=available // count)
