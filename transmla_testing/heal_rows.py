"""Held-out rows of the tiny heal tests, rebuilt independently of converter/heal/data.py, and
the NLL transformers gives them: the reference a heal's reported figures are checked against."""

from __future__ import annotations

from pathlib import Path

import torch

SEQLEN = 64  # tokens per row in the tiny heal tests


def eval_text_rows(folder: Path, text: str, seqlen: int, tokens: int) -> torch.Tensor:
    """The test rows of a heal with ``--eval-text`` = ``text``, rebuilt independently: the
    tokenizer's own output for the text, cut into rows of ``seqlen`` (no special token leads
    them: these tokenizers add none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    assert tok("x")["input_ids"] == tok("x", add_special_tokens=False)["input_ids"]
    ids = tok(text + "\n\n", add_special_tokens=False)["input_ids"]
    n = tokens // seqlen
    return torch.tensor(ids[: n * seqlen]).view(n, seqlen)


def nll(model, rows: torch.Tensor) -> float:
    """Mean next-token NLL of ``model`` (transformers) on ``rows``."""
    with torch.no_grad():
        logits = model(rows).logits[:, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()))
