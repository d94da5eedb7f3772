"""heal(), start to end: check the inputs, cut the text into training / validation / test rows,
estimate memory, load both models, measure what the run starts from, train in a staging (or
--resume) folder, finish the kept weights as they will be written (fp8 scales chosen again,
rounded to the output dtype), measure them on the test rows, write them there and publish it."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from converter import __version__
from converter.calibration.text import load_documents, read_calibration_text
from converter.checkpoint.resume import digest, resumable_folder, resume_folder
from converter.checkpoint.writer import check_destination, parse_size, staging_folder
from converter.conversion.device import keep_freed_memory, peak_rss_bytes, pick_device
from converter.conversion.settings import DTYPES, check_calibration_context
from converter.errors import ConversionError
from converter.heal.data import HealData, split_text
from converter.heal.fp8 import recorded_scales, refold, unfold
from converter.heal.inputs import HealPair, check_pair
from converter.heal.loop import LoopState, TrainSettings, restore, train, trained
from converter.heal.memory import plan_memory, trainable_names
from converter.heal.objective import Figures, choose_precision, eval_precision, held_out
from converter.heal.options import (
    EVALUATIONS,
    PRECISIONS,
    TRAIN_CHOICES,
    HealOptions,
    heal_after_convert,
)
from converter.heal.output import input_weights, write_healed
from converter.heal.precision import check_precision
from converter.heal.state import HealStore, describe_progress
from transmla_vllm.checkpoint_format import REPORT_FILE, CheckpointLayout

log = logging.getLogger(__name__)


def check_options(opts: HealOptions) -> None:
    """Refuse flags that cannot work, before any file is read."""
    checks = (
        (opts.tokens >= 1, f"--tokens {opts.tokens} must be at least 1"),
        (opts.seqlen >= 2, f"--seqlen {opts.seqlen} must be at least 2"),
        (opts.batch_size >= 1, f"--batch-size {opts.batch_size} must be at least 1"),
        (opts.lr > 0, f"--lr {opts.lr} must be positive"),
        (opts.train in TRAIN_CHOICES, f"--train must be one of {TRAIN_CHOICES}"),
        (opts.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}"),
        (opts.hidden_weight >= 0, f"--hidden-weight {opts.hidden_weight} must be >= 0"),
        (opts.eval_tokens >= 1, f"--eval-tokens {opts.eval_tokens} must be at least 1"),
    )
    for ok, sentence in checks:
        if not ok:
            raise ConversionError(sentence)
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


def _text(opts: HealOptions, pair: HealPair) -> HealData:
    documents, _files = load_documents(opts.text_input, pair.tokenizer)
    held = [read_calibration_text(opts.eval_text)[0]] if opts.eval_text else None
    name = Path(opts.eval_text).name if opts.eval_text else None
    return split_text(
        pair.tokenizer, documents, opts.seqlen, opts.eval_tokens, held, opts.seed, name
    )


def _load(pair: HealPair, train: str, device: str, precision: str, checkpointing: bool = True):
    """Teacher (frozen) and student: fp32 on a CPU (bf16 autocast casts as it goes); bf16 on a
    GPU when training in bf16, with the trained weights kept in fp32."""
    from transformers import AutoModelForCausalLM

    from converter.remote_code.modeling_transmla import TransMLAForCausalLM

    dtype = torch.bfloat16 if device != "cpu" and precision == "bf16" else torch.float32
    teacher = AutoModelForCausalLM.from_pretrained(pair.teacher, dtype=dtype).to(device).eval()
    teacher.requires_grad_(False)
    student = TransMLAForCausalLM.from_pretrained(pair.student, dtype=dtype).to(device)
    layout = CheckpointLayout.from_config(pair.student_config)
    return teacher, make_trainable(student, trainable_names(layout, train), checkpointing)


def make_trainable(student, names: list[str], checkpointing: bool = True):
    """Train ``names`` (kept in fp32), freeze the rest; with ``checkpointing`` keep only each
    layer's input for the backward pass."""
    wanted = set(names)
    for name, p in student.named_parameters():
        p.requires_grad_(name in wanted)
        if name in wanted:
            p.data = p.data.float()
    if checkpointing:
        kwargs = {"use_reentrant": False}
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return student


def _fingerprint(opts: HealOptions, pair: HealPair, data: HealData, device: str) -> dict:
    """What must not change between an interrupted --resume run and the one continuing it."""
    weights = sorted(p.name for p in pair.student.glob("*.safetensors"))
    sizes = {f: (pair.student / f).stat().st_size for f in weights}
    settings = {k: v for k, v in asdict(opts).items() if k not in ("resume", "overwrite")}
    settings.pop("dst")
    held = data.validation.numpy().tobytes() + data.test.numpy().tobytes()
    return {
        "converter version": __version__,
        "teacher": str(pair.teacher.resolve()),
        "student": str(pair.student.resolve()) + "/" + digest(json.dumps(sizes)),
        "student config": digest(json.dumps(pair.student_config, sort_keys=True)),
        "text tokens": digest(data.train.numpy().tobytes() + held),
        "settings": digest(json.dumps(settings, sort_keys=True)),
        "device": device,
        "precision": choose_precision(opts.precision, device),
    }


def _figures(fig: Figures) -> dict:
    return {"nll": fig.nll, "ppl": fig.ppl, "kl": fig.kl}


def measure_before(teacher, student, data: HealData, device: str, precision: str, batch: int):
    """What the run starts from, measured once: the teacher's validation and test figures, the
    input's test figures, and (bf16 on a CPU) whether bf16 trains against the teacher the run
    measures (heal/precision.py)."""
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
        before[f"teacher_{name}"] = _figures(held_out(teacher, rows, device, batch, numerics))
    before["input_test"] = _figures(held_out(student, data.test, device, batch, numerics, teacher))
    log.info(
        "before healing: teacher test PPL %.3f, input test PPL %.3f (KL %.4f)",
        before["teacher_test"]["ppl"],
        before["input_test"]["ppl"],
        before["input_test"]["kl"],
    )
    return before


def as_written(student, dtype: torch.dtype) -> None:
    """Round the trained weights to the output dtype (in place), so what is measured next is
    what the written files hold."""
    with torch.no_grad():
        for p in trained(student).values():
            p.copy_(p.to(dtype).to(p.dtype))


def heal(opts: HealOptions) -> Path:
    """Distil ``opts.teacher`` into the converted ``opts.student``; write ``opts.dst``."""
    started = time.time()
    check_options(opts)
    dst = Path(opts.dst)
    if not opts.resume and resume_folder(dst).is_dir():
        log.warning(
            "%s holds the progress of an interrupted --resume run; this run does not use it "
            "(add --resume to continue it, or delete it)",
            resume_folder(dst),
        )
    pair = check_pair(opts.teacher, opts.student, opts.revision)
    check_calibration_context(opts.seqlen, pair.spec, "--seqlen")
    data = _text(opts, pair)
    device = pick_device(opts.device)
    keep_freed_memory()
    precision = choose_precision(opts.precision, device)
    layout = CheckpointLayout.from_config(pair.student_config)
    memory = plan_memory(pair.spec, layout, opts.train, opts.batch_size, opts.seqlen, device)
    log.info("%s", memory.describe())
    memory.check()
    steps = data.steps(opts.tokens, opts.batch_size)
    passes = data.passes(steps, opts.batch_size)
    if passes > 1:
        log.info(
            "--tokens %d is more than the %d training tokens: %d passes over the text (the "
            "validation and test rows stay out of every pass)",
            opts.tokens,
            data.train.numel(),
            passes,
        )
    teacher, student = _load(pair, opts.train, device, precision, memory.checkpointing)
    report_path = pair.student / REPORT_FILE
    student_report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    scales = recorded_scales(student_report)
    if scales is not None:
        unfold(student, scales)
    out_dtype = DTYPES.get(str(pair.student_config.get("dtype")), torch.float32)
    folder = (
        (lambda d, o: resumable_folder(d, o, describe_progress)) if opts.resume else staging_folder
    )
    with folder(dst, opts.overwrite) as tmp:
        store = HealStore(tmp, _fingerprint(opts, pair, data, device)) if opts.resume else None
        loaded = store.load() if store is not None else None
        if loaded is not None:
            state, resumed = loaded
            log.info("resuming from %s: %d of %d steps were done", tmp, state.step, steps)
        else:
            state, resumed = LoopState(), None
            state.before = measure_before(
                teacher, student, data, device, precision, opts.batch_size
            )
        precision = state.before["precision"]
        log.info(
            "training in %s on %s%s",
            precision,
            device,
            " (--precision auto: this CPU has AMX bf16 tiles)"
            if opts.precision == "auto" and device == "cpu" and precision == "bf16"
            else "",
        )
        every = opts.eval_every or max(1, opts.tokens // EVALUATIONS)
        cfg = TrainSettings(
            tokens=opts.tokens,
            batch_size=opts.batch_size,
            lr=opts.lr,
            eval_every=max(1, every // (opts.batch_size * opts.seqlen)),
            hidden_weight=opts.hidden_weight,
            device=device,
            precision=precision,
        )
        state = train(student, teacher, data, cfg, state, store.save if store else None, resumed)
        restore(student, state.best)
        kept, fp8_entries, after = _finish(
            opts, pair, data, state, (teacher, student), device, out_dtype, scales is not None
        )
        summary = _summary(opts, data, cfg, state, steps, passes, device, started)
        summary.update(kept=kept, test=_test_summary(state, after, device, out_dtype))
        _log_result(summary)
        shard_bytes = parse_size(opts.max_shard_size)
        write_healed(
            tmp, pair.student, pair.student_config, student, summary, shard_bytes, fp8_entries
        )
        if store is not None:
            store.clear()
    log.info("healed model written to %s", dst)
    return dst


def _finish(
    opts: HealOptions,
    pair: HealPair,
    data: HealData,
    state: LoopState,
    models: tuple,
    device: str,
    out_dtype: torch.dtype,
    rescale: bool,
) -> tuple[str, list[dict] | None, Figures]:
    """The kept weights as they will be written (fp8 scales chosen again when ``rescale``,
    rounded to ``out_dtype``), measured on the test rows; the input's weights instead when no
    step beat them on validation, or when the healed ones measure worse on the test rows (unless
    --keep-worse). Returns (what is written: "healed" or "input", the new fp8 report entries,
    the test figures of what is written)."""
    teacher, student = models
    numerics = state.before["precision"]
    before = Figures(state.before["input_test"]["nll"], state.before["input_test"]["kl"])
    if state.best_step == 0:
        log.warning("no training step improved the validation figure: the input is written")
        restore(student, input_weights(pair.student, list(trained(student))))
        return "input", None, before
    fp8_entries = refold(student, data.train, device, out_dtype) if rescale else None
    as_written(student, out_dtype)
    after = held_out(student, data.test, device, opts.batch_size, numerics, teacher)
    if after.nll > before.nll:
        verdict = (
            "--keep-worse: the healed weights are written anyway"
            if opts.keep_worse
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
        if not opts.keep_worse:
            restore(student, input_weights(pair.student, list(trained(student))))
            return "input", None, before
    return "healed", fp8_entries, after


def _test_summary(state: LoopState, after: Figures, device: str, dtype: torch.dtype) -> dict:
    b = state.before
    numerics = eval_precision(device, b["precision"])
    return {
        "ppl": {
            "teacher": b["teacher_test"]["ppl"],
            "before": b["input_test"]["ppl"],
            "after": after.ppl,
        },
        "kl": {"before": b["input_test"]["kl"], "after": after.kl},
        "measured_on": f"the weights as written ({str(dtype).removeprefix('torch.')}), "
        f"forward in {numerics} on {device}",
    }


def _summary(
    opts: HealOptions,
    data: HealData,
    cfg: TrainSettings,
    state: LoopState,
    steps: int,
    passes: int,
    device: str,
    started: float,
) -> dict:
    """The report's ``heal`` entry; ``settings`` also goes into config.json."""
    first = state.history[0]
    best = next(h for h in state.history if h["step"] == state.best_step)
    return {
        "settings": {
            "teacher": opts.teacher,
            "tokens": steps * cfg.batch_size * data.seqlen,
            "seqlen": data.seqlen,
            "batch_size": cfg.batch_size,
            "steps": steps,
            "passes": passes,
            "lr": cfg.lr,
            "lr_rule": "AdamW step relative to each tensor's RMS",
            "train": opts.train,
            "hidden_weight": cfg.hidden_weight,
            "loss": "KL(teacher || student)" + (" + hidden-state MSE" if cfg.hidden_weight else ""),
            "text": Path(opts.calib_text).name if opts.calib_text else opts.text_input.describe(),
            "chat": opts.calib_chat,
            "held_out": data.held_out_source,
            "validation_tokens": int(data.validation.numel()),
            "test_tokens": int(data.test.numel()),
            "device": device,
            "precision": cfg.precision,
            "seed": opts.seed,
            "converter_version": __version__,
        },
        "rows": data.describe(),
        "precision_check": state.before.get("precision_check"),
        "validation": {
            "ppl": {
                "teacher": state.before["teacher_validation"]["ppl"],
                "before": first["validation_ppl"],
                "best": best["validation_ppl"],
            },
            "kl": {"before": first["validation_kl"], "best": best["validation_kl"]},
        },
        "best_step": state.best_step,
        "guard_events": state.events,
        "stopped_early": state.stopped,
        "history": state.history,
        "seconds": round(state.seconds, 1),  # the loop, all runs of a --resume together
        "wall_seconds": round(time.time() - started, 1),  # this run, loading included
        "peak_rss_bytes": peak_rss_bytes(),
    }


def _log_result(summary: dict) -> None:
    test, settings = summary["test"]["ppl"], summary["settings"]
    log.info(
        "test PPL %.3f -> %.3f (teacher %.3f; %s) after %d tokens in %.0f s; kept step %d of %d "
        "(validation PPL %.3f -> %.3f); written: %s weights",
        test["before"],
        test["after"],
        test["teacher"],
        summary["test"]["measured_on"],
        settings["tokens"],
        summary["seconds"],
        summary["best_step"],
        settings["steps"],
        summary["validation"]["ppl"]["before"],
        summary["validation"]["ppl"]["best"],
        "the healed" if summary["kept"] == "healed" else "the input's",
    )


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
