"""heal(), start to end: check the inputs, cut the text into training / validation / test rows,
estimate memory, load both models, measure what the run starts from, train in a staging (or
--resume) folder, finish the kept weights as they will be written, write them there and publish
it. Each of those is its own module; this one only puts them in order. Under torchrun every rank
runs the same order (heal/distributed.py) and rank 0 alone writes."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from converter.checkpoint.resume import resumable_folder, resume_folder
from converter.checkpoint.writer import check_destination, parse_size, staging_folder
from converter.conversion.device import keep_freed_memory, pick_device
from converter.conversion.settings import DTYPES, check_calibration_context
from converter.heal.baseline import measure_before
from converter.heal.callbacks import standard
from converter.heal.checks import check_options
from converter.heal.data import HealData, read_heal_text
from converter.heal.distributed import (
    SINGLE,
    Launch,
    barrier,
    end,
    quiet_rank,
    shard,
    start,
    under_torchrun,
)
from converter.heal.finish import choose_written
from converter.heal.fp8 import recorded_scales, unfold
from converter.heal.inputs import check_pair
from converter.heal.loop import LoopState, TrainSettings, trained
from converter.heal.memory import check_generation_memory, plan_memory
from converter.heal.models import load_models
from converter.heal.objective import choose_precision
from converter.heal.options import EVALUATIONS, HealOptions, heal_after_convert
from converter.heal.output import write_healed
from converter.heal.shared import share_frozen
from converter.heal.state import HealStore, describe_progress, fingerprint
from converter.heal.summary import log_result, memory_summary, summary
from converter.heal.teacher_text import TEACHER_TEXT_FILE
from converter.heal.trainer import Trainer
from transmla_vllm.checkpoint_format import REPORT_FILE, CheckpointLayout

log = logging.getLogger(__name__)


def train_settings(opts: HealOptions, device: str, precision: str) -> TrainSettings:
    """The loop's settings from the flags (--eval-every in tokens -> steps)."""
    every = opts.eval_every or max(1, opts.tokens // EVALUATIONS)
    return TrainSettings(
        tokens=opts.tokens,
        batch_size=opts.batch_size,
        lr=opts.lr,
        eval_every=max(1, every // (opts.batch_size * opts.seqlen)),
        hidden_weight=opts.hidden_weight,
        device=device,
        precision=precision,
    )


def _log_passes(opts: HealOptions, data: HealData) -> int:
    """Passes over the training rows the run makes (said when more than one)."""
    passes = data.passes(data.steps(opts.tokens, opts.batch_size), opts.batch_size)
    if passes > 1:
        log.info(
            "--tokens %d is more than the %d training tokens: %d passes over the text (the "
            "validation and test rows stay out of every pass)",
            opts.tokens,
            data.train.numel(),
            passes,
        )
    return passes


def _log_precision(opts: HealOptions, device: str, precision: str) -> None:
    log.info(
        "training in %s on %s%s",
        precision,
        device,
        " (--precision auto: this CPU has AMX bf16 tiles)"
        if opts.precision == "auto" and device == "cpu" and precision == "bf16"
        else "",
    )


def heal(opts: HealOptions) -> Path:
    """Distil ``opts.teacher`` into the converted ``opts.student``; write ``opts.dst``. Started
    by torchrun, each rank joins the process group first and trains its shard."""
    if not under_torchrun():
        return _heal(opts, SINGLE, pick_device(opts.device))
    launch, device = start(pick_device(opts.device), opts.dist_timeout)
    quiet_rank(launch)
    try:
        return _heal(opts, launch, device)
    finally:
        end(launch)


def _teacher_text(opts: HealOptions, pair, device: str, cache: Path | None):
    """--teacher-text: the teacher's documents, written by vLLM (freed again before the models
    heal trains are loaded) or read from a --resume folder's cache; None when not asked for."""
    if opts.teacher_text is None:
        return None
    from converter.heal.teacher_text import generate_teacher_text, generation_memory, read_prompts

    if cache is None or not (cache / TEACHER_TEXT_FILE).is_file():
        check_generation_memory(generation_memory(pair.spec, opts.seqlen, device=device), device)
    prompts = read_prompts(Path(opts.teacher_prompts)) if opts.teacher_prompts else None
    return generate_teacher_text(
        pair.teacher, opts.teacher_text, seed=opts.seed, temperature=opts.teacher_temperature,
        top_p=opts.teacher_top_p, prompts=prompts, max_model_len=opts.seqlen, cache=cache,
        device=device,
    )  # fmt: skip


def _place_teacher_text(generated, folder: Path, keep: bool) -> None:
    """The generated text goes into the published folder only with --keep-teacher-text."""
    if generated is None:
        return
    from converter.heal.teacher_text import save_cached

    path = folder / TEACHER_TEXT_FILE
    if keep and not path.is_file():
        save_cached(folder, generated)
    elif not keep:
        path.unlink(missing_ok=True)


def _output_folder(opts: HealOptions, dst: Path, launch: Launch):
    """Where rank 0 writes: a staging (or --resume) folder published on success; on the other
    ranks, nothing (None)."""
    if not launch.main:
        return contextlib.nullcontext(None)
    if opts.resume:
        return resumable_folder(dst, opts.overwrite, describe_progress)
    return staging_folder(dst, opts.overwrite)


def _heal(opts: HealOptions, launch: Launch, device: str) -> Path:
    started = time.time()
    check_options(opts, launch)
    dst = Path(opts.dst)
    if not opts.resume and resume_folder(dst).is_dir():
        log.warning(
            "%s holds the progress of an interrupted --resume run; this run does not use it "
            "(add --resume to continue it, or delete it)",
            resume_folder(dst),
        )
    if launch.sharded:
        log.info(
            "launch: %s; --batch-size %d is the global batch", launch.describe(), opts.batch_size
        )
    pair = check_pair(opts.teacher, opts.student, opts.revision)
    check_calibration_context(opts.seqlen, pair.spec, "--seqlen")
    with _output_folder(opts, dst, launch) as tmp:
        barrier(launch)  # rank 0 has made (and locked) the folder --resume saves into
        generated = _teacher_text(opts, pair, device, resume_folder(dst) if opts.resume else None)
        documents = generated.documents if generated is not None else None
        data = read_heal_text(opts, pair.tokenizer, documents)
        keep_freed_memory()
        precision = choose_precision(opts.precision, device)
        layout = CheckpointLayout.from_config(pair.student_config)
        # FSDP shards each model's layers on its own: a tensor both would hold is not held once
        share = opts.share and not launch.sharded
        if opts.share and launch.sharded:
            log.info("under torchrun teacher and student keep their own copies (each is sharded)")
        memory = plan_memory(
            pair.spec, layout, opts.train, opts.batch_size, opts.seqlen, device, share,
            launch.ranks, launch.per_node,
        )  # fmt: skip
        log.info("%s", memory.describe())
        memory.check()
        passes = _log_passes(opts, data)
        teacher, student = load_models(pair, opts.train, device, precision, memory.checkpointing)
        sharing = share_frozen(teacher, student, layout.kept_from_source()) if share else None
        if sharing is not None:
            memory.warn_if_shared_less(sharing.shared_bytes)
        report_path = pair.student / REPORT_FILE
        student_report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        scales = recorded_scales(student_report)
        if scales is not None:
            unfold(student, scales)  # on the whole tensors, before they are sharded
        shard(teacher, launch)
        shard(student, launch)
        out_dtype = DTYPES.get(str(pair.student_config.get("dtype")), torch.float32)
        store = (
            HealStore(
                resume_folder(dst), fingerprint(opts, pair, data, device), launch,
                keep=(TEACHER_TEXT_FILE,),
            )
            if opts.resume
            else None
        )  # fmt: skip
        state = store.load() if store is not None else None
        resumed = state is not None
        if resumed:
            log.info(
                "resuming from %s: %d of %d steps were done",
                store.folder,
                state.step,
                data.steps(opts.tokens, opts.batch_size),
            )
        else:
            state = LoopState()
            state.before = measure_before(
                teacher, student, data, device, precision, opts.batch_size, launch
            )
        _log_precision(opts, device, state.before["precision"])
        cfg = train_settings(opts, device, state.before["precision"])
        trainer = Trainer(student, teacher, data, cfg, state, standard(store), launch)
        if resumed:
            store.restore(trainer)
        trainer.fit()
        written = choose_written(
            student, teacher, pair.student, data, state, device, opts.batch_size, out_dtype,
            scales is not None, opts.keep_worse, launch,
        )  # fmt: skip
        heal_summary = summary(opts, data, cfg, state, passes, written, out_dtype, started, launch)
        if generated is not None:
            heal_summary["teacher_text"] = generated.as_report()
        heal_summary["memory"] = memory_summary(memory, sharing, device, trained(student), launch)
        log_result(heal_summary)
        shard_bytes = parse_size(opts.max_shard_size)
        write_healed(
            tmp, pair.student, pair.student_config, student, heal_summary, shard_bytes,
            written.fp8_scales, launch,
        )  # fmt: skip
        if store is not None and launch.main:
            store.clear()
        if launch.main:
            _place_teacher_text(generated, tmp, opts.keep_teacher_text)
    barrier(launch)  # every rank ends once rank 0 has published
    log.info("healed model written to %s", dst)
    return dst


def convert_and_heal(convert_opts, **settings) -> Path:
    """``python -m converter --src S --dst D --heal-tokens N``: convert into a hidden sibling of
    D, heal it into D on the calibration text, remove the sibling. ``settings`` are HealOptions
    fields (tokens, train); the rest comes from ``convert_opts`` (options.py FROM_CONVERT) or
    heal's defaults. With --resume a finished sibling is reused and both steps continue where they
    stopped."""
    from converter.checkpoint.source import resolve_source
    from converter.conversion.pipeline import convert

    dst = Path(convert_opts.dst)
    check_destination(dst, convert_opts.overwrite, convert_opts.src)
    inner = dst.absolute().parent / f".{dst.name}.converted"
    if convert_opts.resume and (inner / "config.json").is_file():
        log.info("reusing the finished conversion in %s", inner)
    else:
        convert(replace(convert_opts, dst=str(inner), overwrite=True))
    teacher = str(resolve_source(convert_opts.src, convert_opts.revision))
    opts = heal_after_convert(convert_opts, teacher, str(inner), **settings)
    try:
        heal(opts)
    except BaseException:
        if convert_opts.resume:
            log.warning("the finished conversion is kept in %s for --resume", inner)
        else:
            shutil.rmtree(inner, ignore_errors=True)
        raise
    shutil.rmtree(inner, ignore_errors=True)
    return dst
