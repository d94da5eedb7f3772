"""--resume for heal: the loop's state, saved in the resume folder at every evaluation.

Each save is a new folder of torch.distributed.checkpoint (DCP) files: the trained weights,
AdamW's moments and the best weights so far, each rank writing its own shards (one process
writes them all). The progress file (history, where the loop is, the settings' fingerprint)
names that folder and is written by rank 0, renamed into place once every rank has finished
its part, so a kill of any process at any moment leaves a consistent pair. DCP reshards on
load: a state saved by 2 ranks continues on 1 and the other way round. A run with other
settings is refused by name, like a conversion's (converter/checkpoint/resume.py, whose folder,
lock and publishing it reuses).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from converter import __version__
from converter.checkpoint.resume import _write_atomic, check_fingerprint, digest, empty_folder
from converter.errors import ConversionError
from converter.heal.data import HealData
from converter.heal.distributed import SINGLE, Launch, barrier, is_sharded, local
from converter.heal.inputs import HealPair
from converter.heal.loop import LoopState
from converter.heal.objective import choose_precision
from converter.heal.options import HealOptions

log = logging.getLogger(__name__)

PROGRESS = "heal-progress.json"
STATE_PREFIX = "heal-state-"  # + the step: a folder of DCP files
DCP_METADATA = ".metadata"  # the file DCP writes last, once every rank's shards are written


# options that change how a run is done but not what it computes: a --resume may change them
NOT_FINGERPRINTED = ("resume", "overwrite", "dst", "share", "dist_timeout", "keep_teacher_text")


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
        "device": torch.device(device).type,  # a state moves between GPUs as ranks change
        "precision": choose_precision(opts.precision, device),
    }


class HealStore:
    """The resume folder's progress; every rank holds one, rank 0 alone writes the progress
    file and removes what it replaces."""

    def __init__(
        self, folder: Path, fingerprint: dict, launch: Launch = SINGLE, keep: tuple[str, ...] = ()
    ) -> None:
        self.folder, self.fingerprint, self.launch = folder, fingerprint, launch
        self.keep = set(keep)  # files of the folder that are not the loop's (teacher text)
        self._saved: dict | None = None

    def load(self) -> LoopState | None:
        """The saved loop state (weights and moments follow with ``restore``), or None and an
        emptied folder when there is none; anything else in the folder (a save or the output
        files of a run killed while writing them) is removed."""
        main = self.launch.main
        if not (self.folder / PROGRESS).is_file():
            if main:
                empty_folder(self.folder, keep=self.keep)
            barrier(self.launch)
            return None
        try:
            saved = json.loads((self.folder / PROGRESS).read_text())
            folder = self.folder / saved["state"]
            if not (folder / DCP_METADATA).is_file():
                raise OSError(f"{folder.name} has no {DCP_METADATA}")
        except (OSError, ValueError, KeyError) as exc:
            raise ConversionError(
                f"the heal progress in {self.folder} cannot be read ({exc}); delete that folder "
                "to start over"
            ) from exc
        where = f"the heal progress in {self.folder} (step {saved['step']})"
        check_fingerprint(saved["fingerprint"], self.fingerprint, where)
        if main:
            empty_folder(self.folder, keep={PROGRESS, saved["state"], *self.keep})
        barrier(self.launch)
        self._saved = saved
        return LoopState(**{k: saved[k] for k in _CARRIED}, best={})

    def restore(self, trainer) -> None:
        """Put the saved weights, moments and best weights into ``trainer`` (resharded by DCP
        when the state was saved by another number of ranks)."""
        saved = self._saved
        assert saved is not None, "restore follows a load that found a state"
        ranks = saved.get("ranks", 1)
        if ranks != self.launch.ranks:
            log.info(
                "the state was saved by %d rank%s; torch.distributed.checkpoint reshards it for %d",
                ranks,
                "" if ranks == 1 else "s",
                self.launch.ranks,
            )
        fresh = saved["optimizer_fresh"]
        blob = _state(trainer, with_optimizer=not fresh)
        blob["best"] = {n: _empty_like(p) for n, p in trainer.params.items()}
        try:
            dcp.load(
                blob, checkpoint_id=self.folder / saved["state"], no_dist=not self.launch.sharded
            )
        except Exception as exc:  # DCP wraps each rank's failure in its own exception
            raise ConversionError(
                f"the heal state {saved['state']} in {self.folder} cannot be read "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); delete "
                "that folder to start over"
            ) from exc
        if fresh:
            set_model_state_dict(trainer.student, blob["model"], options=_OPTIONS)
        else:
            set_state_dict(
                trainer.student,
                trainer.optimizer,
                model_state_dict=blob["model"],
                optim_state_dict=blob["optimizer"],
                options=_OPTIONS,
            )
        trainer.state.best = {n: local(t).clone() for n, t in blob["best"].items()}

    def save(self, trainer) -> None:
        """Every rank writes its shards into a new folder; once all have, rank 0 points the
        progress file at it and removes the previous one."""
        state = trainer.state
        name = f"{STATE_PREFIX}{state.step:08d}"
        fresh = not trainer.optimizer.state  # just reset by the divergence guard
        blob = _state(trainer, with_optimizer=not fresh)
        blob["best"] = {n: _as_param(state.best[n], p) for n, p in trainer.params.items()}
        if self.launch.main:
            shutil.rmtree(self.folder / name, ignore_errors=True)  # a killed run's, unnamed
        barrier(self.launch)
        dcp.save(blob, checkpoint_id=self.folder / name, no_dist=not self.launch.sharded)
        barrier(self.launch)  # every rank's shards are on disk
        if not self.launch.main:
            return
        body = {k: getattr(state, k) for k in _CARRIED}
        body.update(
            state=name,
            seconds=state.history[-1]["seconds"],  # all runs so far
            optimizer_fresh=fresh,
            ranks=self.launch.ranks,
            fingerprint=self.fingerprint,
        )
        text = json.dumps(body, indent=1).encode()
        _write_atomic(self.folder / PROGRESS, lambda f: f.write(text))
        for old in self.folder.glob(f"{STATE_PREFIX}*"):
            if old.name != name:
                shutil.rmtree(old) if old.is_dir() else old.unlink()

    def clear(self) -> None:
        """Remove the progress before the finished folder is published (rank 0)."""
        (self.folder / PROGRESS).unlink(missing_ok=True)
        for path in self.folder.glob(f"{STATE_PREFIX}*"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


# LoopState's fields the progress file carries (the best weights go into the DCP folder)
_CARRIED = (
    "step", "best_nll", "best_step", "history", "seconds", "start_kl", "lr_scale", "recent_kl",
    "events", "stopped", "before",
)  # fmt: skip
# the frozen weights are not in a save; DCP itself refuses a save that lacks a trained one
_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


def _state(trainer, with_optimizer: bool) -> dict:
    """The trained weights (and AdamW's state) as DCP saves and loads them: keyed by name,
    sharded tensors as DTensors so DCP can reshard them."""
    if not with_optimizer:
        return {"model": get_model_state_dict(trainer.student, options=_OPTIONS)}
    model, optimizer = get_state_dict(trainer.student, trainer.optimizer, options=_OPTIONS)
    return {"model": model, "optimizer": optimizer}


def _as_param(shard: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's ``shard`` of a best weight (fp32, cpu) as a tensor shaped like ``param``."""
    if not is_sharded(param):
        return shard
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        shard, param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
    )


def _empty_like(param: torch.Tensor) -> torch.Tensor:
    """Where DCP loads a best weight: fp32 on the cpu, sharded like ``param``."""
    return _as_param(torch.empty(local(param).shape, dtype=torch.float32), param)


def describe_progress(folder: Path) -> str:
    """What an interrupted run leaves, for the resume folder's warning."""
    from converter.heal.teacher_text import TEACHER_TEXT_FILE

    text = "; the teacher text is kept" if (folder / TEACHER_TEXT_FILE).is_file() else ""
    try:
        step = json.loads((folder / PROGRESS).read_text())["step"]
    except (OSError, ValueError, KeyError):
        return "no evaluation point reached yet" + text
    return f"{step} training steps done" + text
