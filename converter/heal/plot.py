"""The heal at a glance: a PNG beside transmla_report.json (and shown in the model card) with
held-out perplexity and KL against the tokens trained on.

Left: validation PPL at every evaluation, the teacher's validation PPL as a line, the test PPL
of the input and of the weights as written (the reported figures), and the kept step. Right:
training KL (the mean since the previous evaluation) and validation KL, on a log scale.
matplotlib is an optional extra; without it the run says so once and writes no picture."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transmla_vllm.checkpoint_format import HEAL_PLOT_FILE

log = logging.getLogger(__name__)
INSTALL_HINT = "pip install 'transmla-vllm[plot]'"


def write_plot(folder: Path, heal: dict[str, Any]) -> str | None:
    """Draw ``heal`` (the report's heal entry) into ``folder``/HEAL_PLOT_FILE; its name, or None
    when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: heal runs on servers
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed, so no %s is drawn: %s", HEAL_PLOT_FILE, INSTALL_HINT)
        return None
    history = heal["history"]
    tokens = [h["tokens"] for h in history]
    kept = next(h for h in history if h["step"] == heal["best_step"])
    test = heal["test"]["ppl"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(tokens, [h["validation_ppl"] for h in history], "o-", label="validation")
    left.axhline(heal["validation"]["ppl"]["teacher"], color="gray", ls="--", label="teacher")
    left.plot([0, kept["tokens"]], [test["before"], test["after"]], "s", color="C3",
              label="test: input, written")  # fmt: skip
    left.axhline(test["teacher"], color="C3", ls=":", label="teacher, test")
    left.axvline(kept["tokens"], color="C2", alpha=0.4, label=f"kept (step {kept['step']})")
    left.set(xlabel="tokens trained on", ylabel="perplexity", title="held-out perplexity")
    left.legend(fontsize=8)
    trained = [h for h in history if h["train_kl"] is not None]
    right.plot([h["tokens"] for h in trained], [h["train_kl"] for h in trained], ".-",
               label="training")  # fmt: skip
    right.plot(tokens, [h["validation_kl"] for h in history], "o-", label="validation")
    right.set(xlabel="tokens trained on", ylabel="KL(teacher || student), nats", yscale="log",
              title="distance to the teacher")  # fmt: skip
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / HEAL_PLOT_FILE, dpi=100)
    plt.close(fig)
    return HEAL_PLOT_FILE
