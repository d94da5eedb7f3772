"""``--resume``: a conversion that survives being stopped and continues where it was.

With --resume the output is built in a fixed sibling folder, ``.NAME.resume``, that is kept on
any failure (Ctrl-C, SIGTERM, SIGKILL, power loss). After every layer the shards are flushed
to disk, then the calibration hidden states entering the next layer and a small progress file
are written (each by write-then-rename, so a crash leaves the previous layer's progress
intact). A later run with the same settings and --resume cuts the shards back to the end of the
last finished layer and goes on; different settings are refused by name rather than silently
mixed. A lock keeps two runs out of one folder. When complete, the progress files are removed
and the folder is renamed into place like any staging folder.

Cost per layer: one write of the calibration states (128 x 256 tokens: 0.5 GB at hidden 4096).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from converter.checkpoint.writer import _publish, _signals_deferred, check_destination
from converter.errors import ConversionError, Interrupted, describe_os_error

log = logging.getLogger(__name__)

PROGRESS = "progress.json"
LOCK = ".lock"
_PRIVATE = ("progress.json*", "stream-*.pt*", LOCK)


def resume_folder(dst: Path) -> Path:
    return dst.absolute().parent / f".{dst.name}.resume"


def digest(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:16]


@dataclass
class Progress:
    layers_done: int
    tensors_written: int
    report: list[dict]
    h_src: torch.Tensor
    h_conv: torch.Tensor | None
    seconds: float  # spent converting in the earlier runs


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_progress(folder: Path, progress: str, blob_key: str, what: str) -> tuple[dict, dict]:
    """(the progress file, the torch file it names under ``blob_key``); one sentence naming
    ``what`` (whose progress) when either cannot be read."""
    try:
        saved = json.loads((folder / progress).read_text())
        blob = torch.load(folder / saved[blob_key], map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ConversionError(
            f"the {what} in {folder} cannot be read ({exc}); delete that folder to start over"
        ) from exc
    return saved, blob


def check_fingerprint(saved: dict, current: dict, progress: str) -> None:
    """Refuse to continue ``progress`` (what the folder holds, e.g. "the heal progress in X
    (step 40)") when an earlier run recorded a fingerprint entry differently, naming each."""
    differ = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if differ:
        raise ConversionError(
            f"{progress} was made with a different {', '.join(differ)}; rerun with the same "
            "inputs and settings to continue it, or delete that folder to start over"
        )


def empty_folder(folder: Path, keep: set[str] = frozenset()) -> None:
    """Remove everything in a resume folder but its lock and ``keep``."""
    for entry in folder.iterdir():
        if entry.name != LOCK and entry.name not in keep:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


class ResumeState:
    """Progress of one conversion in its resume folder, tied to the settings' fingerprint."""

    def __init__(self, folder: Path, fingerprint: dict) -> None:
        self.folder, self.fingerprint = folder, fingerprint

    def load(self) -> Progress | None:
        """The recorded progress; refuses other settings. With none recorded (a run stopped
        before its first layer finished) the folder is emptied and None returned, so no file of
        that run (a shard of another layout, say) can end up in the checkpoint."""
        if not (self.folder / PROGRESS).is_file():
            empty_folder(self.folder)
            return None
        saved, stream = read_progress(self.folder, PROGRESS, "stream", "progress")
        where = f"the progress in {self.folder} ({_layers(saved['layers_done'])} done)"
        check_fingerprint(saved["fingerprint"], self.fingerprint, where)
        return Progress(
            saved["layers_done"],
            saved["tensors_written"],
            saved["report"],
            stream["h_src"],
            stream["h_conv"],
            float(saved.get("seconds", 0.0)),
        )

    def save(
        self,
        layers_done: int,
        tensors_written: int,
        report: list[dict],
        h_src: torch.Tensor,
        h_conv: torch.Tensor | None,
        seconds: float,
    ) -> None:
        """Record that ``layers_done`` layers are on disk (call after the writer's flush). The
        stream gets a new file per layer and the old one goes only after progress.json points
        to the new one, so a crash at any moment leaves a consistent pair."""
        stream = f"stream-{layers_done:05d}.pt"
        _write_atomic(
            self.folder / stream,
            lambda f: torch.save({"layers_done": layers_done, "h_src": h_src, "h_conv": h_conv}, f),
        )
        body = json.dumps(
            {
                "layers_done": layers_done,
                "tensors_written": tensors_written,
                "stream": stream,
                "seconds": round(seconds, 1),
                "report": report,
                "fingerprint": self.fingerprint,
            },
            indent=1,
        )
        _write_atomic(self.folder / PROGRESS, lambda f: f.write(body.encode()))
        for old in self.folder.glob("stream-*.pt"):
            if old.name != stream:
                old.unlink()


@contextmanager
def resumable_folder(
    dst: Path, overwrite: bool, progress: Callable[[Path], str] | None = None
) -> Iterator[Path]:
    """Like ``staging_folder`` but fixed-named, locked, and kept when anything fails.
    ``progress(folder)`` says what is kept (default: the layers a conversion finished)."""
    check_destination(dst, overwrite)
    folder = resume_folder(dst)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / LOCK, "w")  # noqa: SIM115
    except OSError as exc:
        raise ConversionError(
            f"cannot create {folder} for --resume: {exc.strerror or exc}; choose another --dst"
        ) from exc
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        lock.close()
        raise ConversionError(
            f"another conversion is using {folder} right now; wait for it to finish or stop it"
        ) from exc
    leftover = None
    try:
        try:
            yield folder
        except BaseException:
            done = _layers_done(folder)
            kept = f"{_layers(done)} done" if done else "no layer finished yet"
            log.warning(
                "progress kept in %s (%s); rerun the same command with --resume to continue",
                folder,
                progress(folder) if progress is not None else kept,
            )
            raise
        for pattern in _PRIVATE:
            for path in folder.glob(pattern):
                path.unlink()
        with _signals_deferred() as caught:
            leftover = _publish(folder, dst)
    except OSError as exc:
        raise ConversionError(describe_os_error(exc, dst)) from exc
    finally:
        lock.close()
    if leftover is not None:
        if leftover.is_symlink():
            leftover.unlink()
        else:
            shutil.rmtree(leftover, ignore_errors=True)
    if caught:
        raise Interrupted(caught[0], committed=True)


def _layers_done(folder: Path) -> int:
    try:
        return int(json.loads((folder / PROGRESS).read_text())["layers_done"])
    except (OSError, ValueError, KeyError):
        return 0


def _layers(n: int) -> str:
    return f"{n} layer{'' if n == 1 else 's'}"
