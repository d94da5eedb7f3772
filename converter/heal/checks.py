"""heal's flags checked before any file is read: each refusal one sentence."""

from __future__ import annotations

from pathlib import Path

from converter.checkpoint.writer import check_destination, parse_size
from converter.errors import ConversionError
from converter.heal.distributed import SINGLE, Launch
from converter.heal.options import PRECISIONS, TRAIN_CHOICES, HealOptions


def check_options(opts: HealOptions, launch: Launch = SINGLE) -> None:
    """Refuse flags that cannot work, before any file is read (under torchrun: on every rank,
    so all refuse together)."""
    checks = (
        (opts.tokens >= 1, f"--tokens {opts.tokens} must be at least 1"),
        (opts.seqlen >= 2, f"--seqlen {opts.seqlen} must be at least 2"),
        (opts.batch_size >= 1, f"--batch-size {opts.batch_size} must be at least 1"),
        (opts.lr > 0, f"--lr {opts.lr} must be positive"),
        (opts.train in TRAIN_CHOICES, f"--train must be one of {TRAIN_CHOICES}"),
        (opts.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}"),
        (opts.hidden_weight >= 0, f"--hidden-weight {opts.hidden_weight} must be >= 0"),
        (opts.eval_tokens >= 1, f"--eval-tokens {opts.eval_tokens} must be at least 1"),
        (opts.dist_timeout > 0, f"--dist-timeout {opts.dist_timeout} must be positive"),
    )
    if launch.sharded:
        checks += (
            (
                opts.batch_size % launch.ranks == 0,
                f"--batch-size {opts.batch_size} is the global batch and must be a multiple of "
                f"the {launch.ranks} ranks (each rank takes an equal share of every step)",
            ),
            (
                opts.teacher_text is None,
                "--teacher-text is not supported under torchrun yet: heal in one process, or "
                "train on a corpus (--calib-*)",
            ),
        )
    if opts.teacher_text is None:
        checks += tuple(
            (not given, f"{flag} needs --teacher-text N (the tokens of text the teacher writes)")
            for flag, given in (
                ("--teacher-prompts", opts.teacher_prompts),
                ("--keep-teacher-text", opts.keep_teacher_text),
            )
        )
    for ok, sentence in checks:
        if not ok:
            raise ConversionError(sentence)
    if opts.teacher_text is not None:
        from converter.heal.teacher_text import check_teacher_text_options

        prompts = Path(opts.teacher_prompts) if opts.teacher_prompts else None
        check_teacher_text_options(
            opts.teacher_text, prompts, opts.teacher_temperature, opts.teacher_top_p
        )
    parse_size(opts.max_shard_size)
    dst = Path(opts.dst)
    for flag, other in (("--student", opts.student), ("--teacher", opts.teacher)):
        if Path(other).exists():
            a, b = Path(other).resolve(), dst.resolve()
            if a == b or a in b.parents or b in a.parents:
                raise ConversionError(
                    f"--dst {dst} overlaps {flag} {other}; write the healed model to another folder"
                )
    check_destination(dst, opts.overwrite)
