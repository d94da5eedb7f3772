"""Whether training in bf16 chases the teacher the run reports.

On a CPU, heal can train in bf16 autocast (fast with AMX tiles) while its held-out figures are
fp32, so they compare with ``converter eval``. That is only sound when bf16 and fp32 forwards of
both models agree: when they do not, the student learns the bf16 teacher and is scored against
the fp32 one. Seen on a GGUF-built Qwen2.5 whose rows started with a BOS the model never saw at
position 0: KL(fp32 teacher || bf16 teacher) = 0.46 nats/token, while the student was only 0.018
from its own bf16 self and SmolLM2's teacher 0.0006; heal reported a model better than its
teacher and wrote one worse than its input.

The check runs both models in both precisions on the first training rows, before any step, and
compares each model's precision gap (KL between its own fp32 and bf16 next-token laws) with a
limit: GAP_SHARE of what heal is meant to remove (the fp32 KL between teacher and student on the
same rows: bf16 would move the target by a tenth of the way heal has to go), and never more than
GAP_CAP, about what a finished heal leaves between student and teacher (docs/heal.md). Above
it the run trains in fp32 and says why.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch

from converter.heal.objective import logits

log = logging.getLogger(__name__)
GAP_SHARE = 0.1
GAP_CAP = 0.01  # nats per position
ROWS = 2  # first training rows the check runs on


@dataclass(frozen=True)
class PrecisionCheck:
    teacher_gap: float  # KL(teacher in fp32 || teacher in bf16), nats per position
    student_gap: float  # the same for the student
    distance: float  # KL(teacher || student), both in fp32: what heal is meant to remove
    precision: str  # what the run trains in after the check

    @property
    def limit(self) -> float:
        return gap_limit(self.distance)

    def as_report(self) -> dict:
        return {**asdict(self), "limit": self.limit, "rows": ROWS}


def gap_limit(distance: float) -> float:
    """The largest precision gap bf16 training accepts (see the module docstring)."""
    return min(GAP_SHARE * distance, GAP_CAP)


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean KL(p || q) per position of two [B, T, V] fp32 logits."""
    p, q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@torch.no_grad()
def check_precision(teacher, student, rows: torch.Tensor, device: str) -> PrecisionCheck:
    """Measure both models' bf16-vs-fp32 gaps on ``rows`` and choose bf16 or fp32 (above)."""
    ids = rows[:ROWS]
    was = student.training
    student.eval()
    t32, t16 = (logits(teacher, ids, device, p) for p in ("fp32", "bf16"))
    s32, s16 = (logits(student, ids, device, p) for p in ("fp32", "bf16"))
    student.train(was)
    teacher_gap, student_gap, distance = _kl(t32, t16), _kl(s32, s16), _kl(t32, s32)
    worst = max(teacher_gap, student_gap)
    chosen = "bf16" if worst <= gap_limit(distance) else "fp32"
    check = PrecisionCheck(teacher_gap, student_gap, distance, chosen)
    if chosen == "fp32":
        who = "teacher" if teacher_gap >= student_gap else "student"
        log.warning(
            "bf16 would train against another model than the one heal measures: the %s's bf16 "
            "and fp32 forwards differ by KL %.4f nats/token on the first %d training rows, above "
            "the %.4f bf16 may move the target (a tenth of the teacher-student KL %.4f, at most "
            "%g); training in fp32 instead (slower)",
            who,
            worst,
            ids.shape[0],
            check.limit,
            distance,
            GAP_CAP,
        )
    else:
        log.info(
            "bf16 check: the teacher's and student's bf16 forwards are within KL %.2g and %.2g "
            "of their fp32 ones (limit %.2g; teacher-student KL %.4f)",
            teacher_gap,
            student_gap,
            check.limit,
            distance,
        )
    return check
