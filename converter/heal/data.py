"""Heal text: tokenised once, cut into fixed-length rows (BOS first, like calibration), with a
held-out slice that no training pass ever sees.

Without ``eval_documents`` the held-out rows are the last tenth of the text (at least one row,
at most ``eval_tokens`` worth): a contiguous slice, so no training row overlaps it. Asking for
more tokens than the training rows hold means several passes, each in its own seeded order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from converter.calibration.chunks import body_length, bos_chunks
from converter.errors import ConversionError

log = logging.getLogger(__name__)
HELD_OUT_FRACTION = 10  # 1/10 of the text, when no separate evaluation text is given


@dataclass(frozen=True)
class HealData:
    train: torch.Tensor  # [n, seqlen] training rows
    held_out: torch.Tensor  # [m, seqlen] evaluation rows
    seed: int = 0

    @property
    def seqlen(self) -> int:
        return int(self.train.shape[1])

    def steps(self, tokens: int, batch_size: int) -> int:
        """Optimizer steps that cover ``tokens`` training tokens (at least one)."""
        return max(1, -(-tokens // (batch_size * self.seqlen)))

    def passes(self, steps: int, batch_size: int) -> int:
        return -(-steps * batch_size // self.train.shape[0])

    def order(self, epoch: int) -> torch.Tensor:
        """Row order of pass ``epoch``: a permutation seeded by (seed, pass), so a resumed run
        draws exactly the rows the uninterrupted one does."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.train.shape[0], generator=g)

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        """Rows of optimizer step ``step`` (0-based): the next ``batch_size`` of the stream of
        passes."""
        n = self.train.shape[0]
        first = step * batch_size
        orders = {e: self.order(e) for e in range(first // n, (first + batch_size - 1) // n + 1)}
        rows = [orders[g // n][g % n] for g in range(first, first + batch_size)]
        return self.train[torch.stack(rows)]


def _ids(tokenizer, documents: list[str]) -> list[int]:
    """Token ids of the documents, each followed by a blank line (as calibration does)."""
    encode = tokenizer
    return [t for d in documents for t in encode(d + "\n\n", add_special_tokens=False)["input_ids"]]


def _rows(tokenizer, ids: list[int], seqlen: int) -> torch.Tensor:
    count = len(ids) // body_length(tokenizer, seqlen)
    return bos_chunks(tokenizer, ids, seqlen, count)


def split_text(
    tokenizer,
    documents: list[str],
    seqlen: int,
    eval_tokens: int,
    eval_documents: list[str] | None = None,
    seed: int = 0,
) -> HealData:
    """Training rows and held-out rows of ``seqlen`` tokens (see the module docstring)."""
    body = body_length(tokenizer, seqlen)
    ids = _ids(tokenizer, documents)
    rows = _rows(tokenizer, ids, seqlen)
    max_held = max(1, eval_tokens // body)
    if eval_documents is not None:
        eval_ids = _ids(tokenizer, eval_documents)
        held = _rows(tokenizer, eval_ids[: max_held * body], seqlen)
        if held.shape[0] < 1:
            raise ConversionError(
                f"--eval-text is too short: {len(eval_ids)} tokens, at least {body} needed for "
                f"one held-out sequence of --seqlen {seqlen}; pass more text or lower --seqlen"
            )
        train = rows
    else:
        n_held = min(max(1, rows.shape[0] // HELD_OUT_FRACTION), max_held)
        train, held = rows[: rows.shape[0] - n_held], rows[rows.shape[0] - n_held :]
    if train.shape[0] < 1:
        need = body * (1 if eval_documents is not None else 2)
        raise ConversionError(
            f"heal text is too short: {len(ids)} tokens, at least {need} needed for one "
            f"training sequence of --seqlen {seqlen}"
            + ("" if eval_documents is not None else " plus one held out")
            + "; pass more text or lower --seqlen"
        )
    log.info(
        "heal text: %d training sequences x %d tokens (%d tokens), %d held out (%d tokens)",
        train.shape[0],
        seqlen,
        train.numel(),
        held.shape[0],
        held.numel(),
    )
    return HealData(train, held, seed)
