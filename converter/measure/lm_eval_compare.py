"""The same lm-eval tasks on a source and its conversion, side by side: what ``verify
--lm-eval-tasks`` prints and records (transmla_report.json's ``verification.lm_eval``, shown in
the model card)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from converter.measure.lm_eval import run_lm_eval


def compare_lm_eval(
    src: Path,
    dst: Path,
    tasks: list[str],
    backend: str,
    model_args: str = "",
    limit: int | None = None,
) -> dict[str, Any]:
    """``{"backend", "model_args", "limit", "scores": {task: {metric: {"source", "converted"}}}}``
    with each folder run the same way, one after the other."""
    runs = {
        role: run_lm_eval(folder, backend, tasks, model_args, limit)
        for role, folder in (("source", src), ("converted", dst))
    }
    scores = {
        task: {
            metric: {role: runs[role].scores[task][metric] for role in runs} for metric in metrics
        }
        for task, metrics in runs["source"].scores.items()
    }
    return {"backend": backend, "model_args": model_args, "limit": limit, "scores": scores}


def comparison_rows(comparison: dict[str, Any]) -> list[tuple[str, str, float, float]]:
    """(task, metric, source, converted) per reported metric; the metric without lm-eval's
    filter suffix when it is the default ("none")."""
    rows = []
    for task, metrics in comparison["scores"].items():
        for key, pair in metrics.items():
            metric = key.removesuffix(",none")
            rows.append((task, metric, pair["source"], pair["converted"]))
    return rows


def comparison_lines(comparison: dict[str, Any]) -> list[str]:
    """The printed side by side, one line per task and metric."""
    limit = comparison.get("limit")
    head = f"lm-eval ({comparison['backend']}" + (f", first {limit} items" if limit else "") + ")"
    return [
        f"{head} {task} {metric}: source {s:.4f}, converted {c:.4f} ({c - s:+.4f})"
        for task, metric, s, c in comparison_rows(comparison)
    ]
