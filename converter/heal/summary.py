"""The report's ``heal`` entry (its ``settings`` also go into config.json) and the run's last
log line."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from converter import __version__
from converter.conversion.device import peak_rss_bytes
from converter.heal.data import HealData
from converter.heal.distributed import SINGLE, Launch, gather, held_bytes
from converter.heal.finish import Written
from converter.heal.loop import LoopState, TrainSettings
from converter.heal.memory import MemoryEstimate, measured_peak
from converter.heal.objective import eval_precision
from converter.heal.options import HealOptions
from converter.heal.shared import SharingReport

log = logging.getLogger(__name__)


def test_summary(state: LoopState, written: Written, device: str, dtype: torch.dtype) -> dict:
    b = state.before
    numerics = eval_precision(device, b["precision"])
    return {
        "ppl": {
            "teacher": b["teacher_test"]["ppl"],
            "before": b["input_test"]["ppl"],
            "after": written.test.ppl,
        },
        "kl": {"before": b["input_test"]["kl"], "after": written.test.kl},
        "measured_on": f"the weights as written ({str(dtype).removeprefix('torch.')}), "
        f"forward in {numerics} on {device}",
    }


def summary(
    opts: HealOptions,
    data: HealData,
    cfg: TrainSettings,
    state: LoopState,
    passes: int,
    written: Written,
    out_dtype: torch.dtype,
    started: float,
    launch: Launch = SINGLE,
) -> dict:
    """The report's ``heal`` entry."""
    steps = data.steps(cfg.tokens, cfg.batch_size)
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
            "text": training_text(opts, data),
            "chat": opts.calib_chat,
            "held_out": data.held_out_source,
            "validation_tokens": int(data.validation.numel()),
            "test_tokens": int(data.test.numel()),
            "device": cfg.device,
            "precision": cfg.precision,
            "seed": opts.seed,
            "launch": launch.as_report(),
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
        "kept": written.kept,
        "test": test_summary(state, written, cfg.device, out_dtype),
    }


def training_text(opts: HealOptions, data: HealData) -> str:
    """What the run trained on, in words: the given text, the teacher's, or the mix."""
    given = Path(opts.calib_text).name if opts.calib_text else opts.text_input.describe()
    if opts.teacher_text is None:
        return given
    rows = int(data.train.shape[0])
    if data.teacher_rows == rows:
        return f"text the teacher wrote ({rows} rows)"
    return f"{given} and text the teacher wrote ({data.teacher_rows} of {rows} rows)"


def memory_summary(
    estimate: MemoryEstimate,
    sharing: SharingReport | None,
    device: str,
    trained: dict[str, torch.Tensor],
    launch: Launch = SINGLE,
) -> dict:
    """The estimate heal printed and refused by, the peak this run measured beside it (each
    rank's, under torchrun: a collective), the bytes of trained weights each rank holds, and
    what the student shared with the teacher (None: --no-share)."""
    peak, how = measured_peak(device)
    peaks = [int(p) for p in gather(float(peak), launch)]
    held = [int(b) for b in gather(float(held_bytes(trained)), launch)]
    log.info(
        "memory: peak %s GB (%s), estimate %.2f GB%s",
        " / ".join(f"{p / 1e9:.2f}" for p in peaks),
        how,
        estimate.total / 1e9,
        " per rank" if launch.sharded else "",
    )
    return {
        "estimate_bytes": estimate.as_report(),
        "peak_bytes": max(peaks),
        "peak_bytes_by_rank": peaks,
        "trained_bytes_by_rank": held,
        "peak_measured_as": how,
        "sharing": sharing.as_report() if sharing is not None else None,
    }


def log_result(summary: dict) -> None:
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
