"""Heal text: tokenised once, cut into fixed-length rows that start the way the tokenizer starts
text (calibration/chunks.py), with two slices no training pass ever sees.

- validation: chooses the kept step (and watches for a run going wrong);
- test: measured before training and once more on the weights as written, and never used to
  choose anything, so the figure a run reports is not flattered by the choice it made.

With ``eval_documents`` (--eval-text) the test rows are its first rows and the validation rows
the next ones, each up to ``eval_tokens`` worth (``converter eval --text`` on the same file with
``--ctx SEQLEN --max-tokens`` the test's tokens scores the test rows). Without it both come from
the end of the training text (each options.py HELD_OUT_SLICE_SHARE of it, at least one row, at most
``eval_tokens``): the test rows last, the validation rows just before, contiguous, so no
training row overlaps them. Asking for more tokens than the training rows hold means several
passes, each in its own seeded order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from converter.calibration.chunks import body_length, held_out_count, row_start, text_rows
from converter.calibration.text import load_documents, read_calibration_text
from converter.errors import ConversionError
from converter.heal.options import HELD_OUT_SLICE_SHARE, HealOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealData:
    train: torch.Tensor  # [n, seqlen] training rows
    validation: torch.Tensor  # [m, seqlen] choose the kept step
    test: torch.Tensor  # [k, seqlen] the reported figure
    seed: int = 0
    held_out_source: str = "the end of the training text"
    start: dict | None = None  # how every row starts (calibration/chunks.py RowStart)
    teacher_rows: int = 0  # training rows of text the teacher wrote (--teacher-text)

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

    def describe(self) -> dict:
        """The slices, for the report."""
        return {
            "train_rows": int(self.train.shape[0]),
            "validation_rows": int(self.validation.shape[0]),
            "test_rows": int(self.test.shape[0]),
            "seqlen": self.seqlen,
            "held_out_from": self.held_out_source,
            "start": self.start,
            "train_rows_of_teacher_text": self.teacher_rows,
        }


def _ids(tokenizer, documents: list[str]) -> list[int]:
    """Token ids of the documents, each followed by a blank line (as calibration does)."""
    return [
        t for d in documents for t in tokenizer(d + "\n\n", add_special_tokens=False)["input_ids"]
    ]


def _rows(tokenizer, ids: list[int], seqlen: int) -> torch.Tensor:
    count = len(ids) // body_length(tokenizer, seqlen)
    return text_rows(tokenizer, ids, seqlen, count)


def split_text(
    tokenizer,
    documents: list[str],
    seqlen: int,
    eval_tokens: int,
    eval_documents: list[str] | None = None,
    seed: int = 0,
    eval_name: str | None = None,
    generated: list[str] | None = None,
    train_on_real: bool = True,
) -> HealData:
    """Training, validation and test rows of ``seqlen`` tokens (see the module docstring).
    ``generated`` (text the teacher wrote) adds training rows, never held-out ones; without
    ``train_on_real`` only they are trained on and ``documents`` give the held-out rows."""
    body = body_length(tokenizer, seqlen)
    ids = _ids(tokenizer, documents)
    rows = _rows(tokenizer, ids, seqlen)
    per_slice = max(1, eval_tokens // body)
    if eval_documents is not None:
        eval_ids = _ids(tokenizer, eval_documents)
        held = _rows(tokenizer, eval_ids[: 2 * per_slice * body], seqlen)
        if held.shape[0] < 2:
            raise ConversionError(
                f"--eval-text is too short: {len(eval_ids)} tokens, at least {2 * body} needed "
                f"for one test and one validation sequence of --seqlen {seqlen}; pass more text "
                "or lower --seqlen"
            )
        n_test = min(per_slice, held.shape[0] // 2)
        test, validation = held[:n_test], held[n_test : n_test + per_slice]
        train, source = rows, f"--eval-text {eval_name or ''}".strip()
    else:
        n = min(held_out_count(rows.shape[0], HELD_OUT_SLICE_SHARE), per_slice)
        cut = rows.shape[0] - 2 * n
        train, validation, test = rows[: max(cut, 0)], rows[cut : cut + n], rows[cut + n :]
        source = "the end of the training text"
    teacher_rows = 0
    if generated is not None:
        extra = _rows(tokenizer, _ids(tokenizer, generated), seqlen)
        teacher_rows = int(extra.shape[0])
        train = torch.cat([train, extra]) if train_on_real else extra
        if not train_on_real:
            source = source.replace("the training text", "the bundled calibration text")
        log.info(
            "training rows: %d of text the teacher wrote%s",
            teacher_rows,
            f" mixed with {train.shape[0] - teacher_rows} of the given text"
            if train_on_real
            else " (no heal text was given: the held-out rows are the bundled calibration text's)",
        )
    if train.shape[0] < 1:
        need = body * (1 if eval_documents is not None else 3)
        raise ConversionError(
            f"heal text is too short: {len(ids)} tokens, at least {need} needed for one "
            f"training sequence of --seqlen {seqlen}"
            + ("" if eval_documents is not None else " plus one validation and one test sequence")
            + "; pass more text or lower --seqlen"
        )
    log.info(
        "heal text: %d training sequences x %d tokens (%d tokens); held out from %s: %d "
        "validation sequences (choose the kept step) and %d test sequences (the reported figure)",
        train.shape[0],
        seqlen,
        train.numel(),
        source,
        validation.shape[0],
        test.shape[0],
    )
    start = row_start(tokenizer).as_report()
    return HealData(train, validation, test, seed, source, start, teacher_rows)


def read_heal_text(opts: HealOptions, tokenizer, generated: list[str] | None = None) -> HealData:
    """The rows of the text ``opts`` names (--calib-*, --eval-text), cut as split_text says,
    with the teacher's ``generated`` text added to the training rows; when no text was named
    (the bundled calibration text is the default), that text only gives the held-out rows."""
    documents, _files = load_documents(opts.text_input, tokenizer)
    held = [read_calibration_text(opts.eval_text)[0]] if opts.eval_text else None
    name = Path(opts.eval_text).name if opts.eval_text else None
    return split_text(
        tokenizer, documents, opts.seqlen, opts.eval_tokens, held, opts.seed, name, generated,
        train_on_real=generated is None or opts.text_input.named,
    )  # fmt: skip
