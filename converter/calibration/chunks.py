"""Token rows: tokenised text cut into fixed-length rows that start the way the model's own
tokenizer starts text (calibration, heal, evaluation and the benchmarks share them).

A row begins with the special tokens the tokenizer itself puts before text (Llama-3 adds its
BOS), and with nothing when it adds none, even when it defines a BOS: SmolLM2's and tokenizers
built from GGUF files name a BOS they never add, and a model never saw that token at position 0
in training. Prefixing it anyway makes the first position an input the model does not know
(measured on a GGUF-built Qwen2.5: bf16 and fp32 forwards then disagree by 0.46 nats/token, and
the conversion calibrated on such rows lost 6x what it needed to).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction

import torch

from converter.errors import ConversionError

log = logging.getLogger(__name__)
PROBE = "The quick brown fox"  # any plain text: what the tokenizer adds around it is the answer
_LOGGED: set[str] = set()
# Calibration chunks kept out of the statistics, to choose on: FreqFold per layer (--freqfold
# auto: conversion/plan.py) and, with FreqFold given, whether the reconstruction stage's trained
# attention beats the closed form (conversion/reconstruct.py). A trade between the two uses of a
# small, fixed number of chunks: the statistics the rotation and latent are fitted on keep 7/8,
# and the choices are judged on chunks none of them saw (16 of the default 128).
HELD_OUT_SHARE = Fraction(1, 8)


def held_out_count(rows: int, share: Fraction = HELD_OUT_SHARE) -> int:
    """Rows of ``rows`` held out to choose on: ``share`` of them (rounded down), at least one."""
    return max(1, int(rows * share))


@dataclass(frozen=True)
class RowStart:
    """What leads every row: the token ids the tokenizer adds before text, and why."""

    ids: tuple[int, ...]
    tokens: tuple[str, ...]
    reason: str

    def as_report(self) -> dict:
        return {"tokens": list(self.tokens), "ids": list(self.ids), "reason": self.reason}


def _added_before(tokenizer) -> list[int]:
    """Ids ``tokenizer(text)`` puts before the text's own ids (its post-processor's prefix)."""
    plain = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    full = tokenizer(PROBE, add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return list(full[:k])
    # the text itself tokenised differently (a prefix space, say): keep the leading specials
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    lead = []
    for t in full:
        if t not in special:
            break
        lead.append(t)
    return lead


def row_start(tokenizer) -> RowStart:
    """How this tokenizer starts text (logged once per tokenizer)."""
    ids = _added_before(tokenizer)
    tokens = tuple(tokenizer.convert_ids_to_tokens(ids)) if ids else ()
    bos = getattr(tokenizer, "bos_token", None)
    if ids:
        reason = f"the tokenizer adds {' '.join(tokens)} before text"
    elif bos is not None:
        reason = f"the tokenizer defines BOS {bos} but does not add it to text"
    else:
        reason = "the tokenizer adds no special token before text"
    start = RowStart(tuple(ids), tokens, reason)
    key = f"{getattr(tokenizer, 'name_or_path', '')}|{reason}"
    if key not in _LOGGED:
        _LOGGED.add(key)
        first = " ".join(tokens) if tokens else "the text itself"
        log.info("token rows start with %s (%s)", first, reason)
    return start


def body_length(tokenizer, seqlen: int) -> int:
    """Text tokens per row of ``seqlen``: fewer by the tokens that lead it."""
    return seqlen - len(row_start(tokenizer).ids)


def text_rows(tokenizer, ids: list[int], seqlen: int, count: int, stride: int = 1) -> torch.Tensor:
    """[count, seqlen] token rows; row i is the row start + the body_length tokens from
    ``i * stride`` bodies into ``ids``."""
    head = list(row_start(tokenizer).ids)
    body = seqlen - len(head)
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
    return text_rows(tokenizer, ids, seqlen, count, stride=available // count)
