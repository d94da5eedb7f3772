"""What a finished run writes: the kept weights as they will be written (fp8 scales chosen
again, rounded to the output dtype) and measured on the test rows, or the input's weights when
no step beat them on validation or the healed ones measure worse on the test rows (unless
--keep-worse)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from converter.heal.data import HealData
from converter.heal.distributed import SINGLE, Launch, local
from converter.heal.fp8 import refold
from converter.heal.loop import LoopState, restore, restore_full, trained
from converter.heal.objective import Figures, held_out
from converter.heal.output import input_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Written:
    kept: str  # "healed" or "input"
    fp8_scales: list[dict] | None  # each layer's new fp8 report entry (None: unchanged)
    test: Figures  # the test figures of what is written


def as_written(student, dtype: torch.dtype) -> None:
    """Round the trained weights to the output dtype (in place), so what is measured next is
    what the written files hold."""
    with torch.no_grad():
        for p in trained(student).values():
            mine = local(p)
            mine.copy_(mine.to(dtype).to(mine.dtype))


def choose_written(
    student,
    teacher,
    source: Path,
    data: HealData,
    state: LoopState,
    device: str,
    batch_size: int,
    out_dtype: torch.dtype,
    rescale: bool,
    keep_worse: bool,
    launch: Launch = SINGLE,
) -> Written:
    """Leave in ``student`` what is written (see the module docstring): the best weights,
    rescaled for the fp8 cache when ``rescale``, or the trained tensors of ``source`` (the
    input folder)."""
    restore(student, state.best)
    numerics = state.before["precision"]
    before = Figures(state.before["input_test"]["nll"], state.before["input_test"]["kl"])
    if state.best_step == 0:
        log.warning("no training step improved the validation figure: the input is written")
        restore_full(student, input_weights(source, list(trained(student))))
        return Written("input", None, before)
    fp8_entries = refold(student, data.train, device, out_dtype) if rescale else None
    as_written(student, out_dtype)
    after = held_out(student, data.test, device, batch_size, numerics, teacher, launch)
    if after.nll > before.nll:
        verdict = (
            "--keep-worse: the healed weights are written anyway"
            if keep_worse
            else "the input's weights are written instead (--keep-worse writes the healed ones)"
        )
        log.warning(
            "HEAL MADE THE MODEL WORSE on the test rows: PPL %.3f -> %.3f (the kept step was "
            "chosen on validation rows, which improved: %.3f -> %.3f); %s",
            before.ppl,
            after.ppl,
            state.history[0]["validation_ppl"],
            min(h["validation_ppl"] for h in state.history),
            verdict,
        )
        if not keep_worse:
            restore_full(student, input_weights(source, list(trained(student))))
            return Written("input", None, before)
    return Written("healed", fp8_entries, after)
