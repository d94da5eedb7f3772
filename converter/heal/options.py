"""The heal command's options: HealOptions, the one home of their defaults (``heal --help`` shows
them from here, commands/options.py builds HealOptions from the parsed flags by field name), their
choices, and the few fixed settings the help quotes. No torch here, so ``--help`` stays fast."""

from __future__ import annotations

from dataclasses import dataclass, fields
from fractions import Fraction

from converter.calibration.text import TextOptions

TRAIN_CHOICES = ("attention", "all")  # weights trained: attention only, or every weight
# matmul precision of the training steps: auto = bf16 on a GPU and on a CPU with AMX tiles
PRECISIONS = ("auto", "fp32", "bf16")
EVALUATIONS = 8  # validation evaluations during a run, when --eval-every is not given
# Without --eval-text, the validation rows and the test rows are each this share of the heal
# text, taken from its end (at least one row each, at most --eval-tokens): two slices held out.
# Not the conversion's share (calibration/chunks.py HELD_OUT_SHARE): that is one slice of a fixed,
# small number of chunks (128 by default) that must rank per-layer choices, while heal holds out
# two slices of a text it trains on, each capped by --eval-tokens, so its share decides only on
# short texts, where every row kept for training counts.
HELD_OUT_SLICE_SHARE = Fraction(1, 20)
# Sampling the teacher text: temperature 1 is the teacher's own next-token law, the one the KL
# matches; top-p 0.95 cuts the far tail, where one unlikely token can derail a long document
# into text the teacher would never write.
TEACHER_TEMPERATURE = 1.0
TEACHER_TOP_P = 0.95


@dataclass
class HealOptions(TextOptions):
    """The heal command's options, as the user gave them (see ``heal --help``); the text options
    (calib_text, calib_jsonl, calib_field, calib_dataset, calib_chat) come from TextOptions."""

    teacher: str
    student: str
    dst: str
    tokens: int
    seqlen: int = 512
    # one 512-token sequence per step, a step of 1e-3 of each tensor's RMS: on SmolLM2 at 128 KV
    # elements (32k tokens of the comedies) test PPL 32.84 -> 31.69, against 31.95 at 5e-4 and
    # 31.80 at 2e-3 (which first climbs away from the teacher); 4e-3 and above never beat the
    # input (docs/heal.md, "Settings")
    batch_size: int = 1
    lr: float = 1e-3
    train: str = "attention"
    precision: str = "auto"
    hidden_weight: float = 0.0
    eval_text: str | None = None
    eval_tokens: int = 4096
    eval_every: int | None = None  # tokens; None: EVALUATIONS points over the run
    device: str = "auto"
    seed: int = 0
    max_shard_size: str = "5GB"
    overwrite: bool = False
    resume: bool = False
    revision: str | None = None
    keep_worse: bool = False
    share: bool = True  # hold the student's tensors equal to the teacher's once (heal/shared.py)
    dist_timeout: float = 600.0  # seconds; under torchrun (heal/distributed.py)
    # --teacher-text N: train on N tokens the teacher samples with vLLM (heal/teacher_text.py)
    teacher_text: int | None = None
    teacher_prompts: str | None = None  # a file, one user turn / opening per line
    teacher_temperature: float = TEACHER_TEMPERATURE
    teacher_top_p: float = TEACHER_TOP_P
    keep_teacher_text: bool = False  # write the generated text into --dst


# ``convert --heal-tokens``: the convert options the heal after it takes over, same name and
# meaning (not batch_size: convert's is calibration chunks per forward, heal's sequences per step)
FROM_CONVERT = (
    *(f.name for f in fields(TextOptions)),
    "device",
    "max_shard_size",
    "overwrite",
    "resume",
    "revision",
)


def heal_after_convert(convert_opts, teacher: str, student: str, **settings) -> HealOptions:
    """HealOptions of ``convert --heal-tokens``: heal ``student`` (the conversion) into the
    convert's --dst with the FROM_CONVERT options of ``convert_opts``; ``settings`` (tokens, and
    train when given) are heal's own, the rest heal's defaults."""
    carried = {name: getattr(convert_opts, name) for name in FROM_CONVERT}
    return HealOptions(
        teacher=teacher, student=student, dst=convert_opts.dst, **carried, **settings
    )
