"""What a run starts from, measured once before any step (and saved with --resume, so a
resumed run reports the same figures): the teacher's validation and test figures, the input's
test figures, and (bf16 on a CPU) whether bf16 trains against the teacher the run measures."""

from __future__ import annotations

import logging

from converter.heal.data import HealData
from converter.heal.distributed import SINGLE, Launch
from converter.heal.objective import Figures, held_out
from converter.heal.precision import check_precision

log = logging.getLogger(__name__)


def figures(fig: Figures) -> dict:
    """``fig`` as the report holds it."""
    return {"nll": fig.nll, "ppl": fig.ppl, "kl": fig.kl}


def measure_before(
    teacher,
    student,
    data: HealData,
    device: str,
    precision: str,
    batch: int,
    launch: Launch = SINGLE,
):
    """The ``before`` entry of LoopState (see the module docstring); its ``precision`` is what
    the run trains in."""
    before: dict = {"precision": precision}
    if device == "cpu" and precision == "bf16":
        check = check_precision(teacher, student, data.train, device)
        before["precision_check"] = check.as_report()
        before["precision"] = check.precision
    elif precision == "bf16":
        before["precision_check"] = {
            "skipped": f"on {device} the held-out figures run in bf16 like the training steps"
        }
    numerics = before["precision"]
    for name, rows in (("validation", data.validation), ("test", data.test)):
        fig = held_out(teacher, rows, device, batch, numerics, None, launch)
        before[f"teacher_{name}"] = figures(fig)
    fig = held_out(student, data.test, device, batch, numerics, teacher, launch)
    before["input_test"] = figures(fig)
    log.info(
        "before healing: teacher test PPL %.3f, input test PPL %.3f (KL %.4f)",
        before["teacher_test"]["ppl"],
        before["input_test"]["ppl"],
        before["input_test"]["kl"],
    )
    return before
