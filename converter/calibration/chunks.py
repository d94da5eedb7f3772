"""Token chunks: tokenised text cut into fixed-length rows that start with BOS (calibration and
evaluation share it, so both see text the way the model saw it in training)."""

from __future__ import annotations

import logging

import torch

from converter.errors import ConversionError

log = logging.getLogger(__name__)


def body_length(tokenizer, seqlen: int) -> int:
    """Text tokens per chunk of ``seqlen``: one fewer when a BOS token leads it."""
    return seqlen - (1 if getattr(tokenizer, "bos_token_id", None) is not None else 0)


def bos_chunks(tokenizer, ids: list[int], seqlen: int, count: int, stride: int = 1) -> torch.Tensor:
    """[count, seqlen] token rows; row i is BOS (when the tokenizer has one, as the model saw
    text in training) + the body_length tokens from ``i * stride`` bodies into ``ids``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    body = body_length(tokenizer, seqlen)
    head = [bos] if bos is not None else []
    return torch.tensor(
        [head + ids[i * stride * body : (i * stride + 1) * body] for i in range(count)],
        dtype=torch.long,
    )


def token_chunks(tokenizer, text: str | list[str], samples: int, seqlen: int) -> torch.Tensor:
    """Up to ``samples`` non-overlapping chunks of ``seqlen`` tokens spread over the text."""
    docs = [text] if isinstance(text, str) else text
    ids = [t for d in docs for t in tokenizer(d + "\n\n", add_special_tokens=False)["input_ids"]]
    body = body_length(tokenizer, seqlen)
    available = len(ids) // body if body > 0 else 0
    if available < 1:
        raise ConversionError(
            f"calibration text is too short: {len(ids)} tokens found, at least "
            f"{body} needed for one chunk of --calib-seqlen {seqlen}; pass more "
            "text or lower --calib-seqlen"
        )
    count = min(samples, available)
    if count < samples:
        log.warning(
            "calibration text gives only %d chunks of %d tokens (asked for %d); using %d",
            available,
            seqlen,
            samples,
            count,
        )
    return bos_chunks(tokenizer, ids, seqlen, count, stride=available // count)
