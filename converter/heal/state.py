"""--resume for heal: the loop's state, saved in the resume folder at every evaluation.

The state file (trained weights, AdamW moments, best weights so far, history) gets a new name
per save and the progress file points to it; both are written then renamed, so a kill at any
moment leaves a consistent pair. A run with other settings is refused by name, like a
conversion's (converter/checkpoint/resume.py, whose folder, lock and publishing it reuses).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from converter import __version__
from converter.checkpoint.resume import (
    _write_atomic,
    check_fingerprint,
    digest,
    empty_folder,
    read_progress,
)
from converter.heal.data import HealData
from converter.heal.inputs import HealPair
from converter.heal.loop import LoopState
from converter.heal.objective import choose_precision
from converter.heal.options import HealOptions

PROGRESS = "heal-progress.json"
STATE_PREFIX = "heal-state-"


# options that change how a run is done but not what it computes: a --resume may change them
NOT_FINGERPRINTED = ("resume", "overwrite", "dst", "share")


def fingerprint(opts: HealOptions, pair: HealPair, data: HealData, device: str) -> dict:
    """What must not change between an interrupted --resume run and the one continuing it."""
    weights = sorted(p.name for p in pair.student.glob("*.safetensors"))
    sizes = {f: (pair.student / f).stat().st_size for f in weights}
    settings = {k: v for k, v in asdict(opts).items() if k not in NOT_FINGERPRINTED}
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


class HealStore:
    def __init__(self, folder: Path, fingerprint: dict) -> None:
        self.folder, self.fingerprint = folder, fingerprint

    def load(self) -> tuple[LoopState, tuple[dict[str, torch.Tensor], dict]] | None:
        """The saved state with the trained weights and AdamW's state at that step, or None (and
        an emptied folder) when there is none; anything else in the folder (output files of a
        run killed while writing them) is removed."""
        if not (self.folder / PROGRESS).is_file():
            empty_folder(self.folder)
            return None
        saved, blob = read_progress(self.folder, PROGRESS, "state", "heal progress")
        where = f"the heal progress in {self.folder} (step {saved['step']})"
        check_fingerprint(saved["fingerprint"], self.fingerprint, where)
        empty_folder(self.folder, keep={PROGRESS, saved["state"]})
        state = LoopState(
            step=saved["step"],
            best_nll=saved["best_nll"],
            best_step=saved["best_step"],
            best=blob["best"],
            history=saved["history"],
            seconds=saved["seconds"],
            start_kl=saved["start_kl"],
            lr_scale=saved["lr_scale"],
            recent_kl=saved["recent_kl"],
            events=saved["events"],
            stopped=saved["stopped"],
            before=saved["before"],
        )
        return state, (blob["params"], blob["optimizer"])

    def save(self, state: LoopState, params: dict[str, torch.Tensor], optimizer: dict) -> None:
        name = f"{STATE_PREFIX}{state.step:08d}.pt"
        blob = {"params": params, "optimizer": optimizer, "best": state.best}
        _write_atomic(self.folder / name, lambda f: torch.save(blob, f))
        body = {
            "step": state.step,
            "state": name,
            "best_nll": state.best_nll,
            "best_step": state.best_step,
            "history": state.history,
            "seconds": state.history[-1]["seconds"],  # all runs so far
            "start_kl": state.start_kl,
            "lr_scale": state.lr_scale,
            "recent_kl": state.recent_kl,
            "events": state.events,
            "stopped": state.stopped,
            "before": state.before,
            "fingerprint": self.fingerprint,
        }
        text = json.dumps(body, indent=1).encode()
        _write_atomic(self.folder / PROGRESS, lambda f: f.write(text))
        for old in self.folder.glob(f"{STATE_PREFIX}*.pt"):
            if old.name != name:
                old.unlink()

    def clear(self) -> None:
        """Remove the progress before the finished folder is published."""
        for path in [self.folder / PROGRESS, *self.folder.glob(f"{STATE_PREFIX}*")]:
            path.unlink(missing_ok=True)


def describe_progress(folder: Path) -> str:
    """What an interrupted run leaves, for the resume folder's warning."""
    try:
        step = json.loads((folder / PROGRESS).read_text())["step"]
    except (OSError, ValueError, KeyError):
        return "no evaluation point reached yet"
    return f"{step} training steps done"
