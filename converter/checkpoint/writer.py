"""The output folder: a staging folder renamed into place only when complete (so an interrupted
run never leaves a folder that looks like a finished checkpoint), plus the files copied into it.

Failures inside the staging block (disk full, permissions, Ctrl-C, SIGTERM) remove the staging
folder; SIGKILL cannot be caught, so its staging folder carries the owner's pid and host and the
next run into the same --dst removes it once that process is gone."""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from converter.errors import (
    INTERRUPT_SIGNALS,
    ConversionError,
    Interrupted,
    describe_os_error,
)
from converter.sizes import parse_bytes

log = logging.getLogger(__name__)

# Files copied verbatim from the source: tokenizer, chat template, generation defaults, licence.
VERBATIM_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "LICENSE",
    "LICENSE.txt",
    "LICENSE.md",
)


def parse_size(text: str) -> int:
    """--max-shard-size: '5GB', '500MB', '2GiB' or a plain byte count -> bytes."""
    return parse_bytes(text, "--max-shard-size")


# Staging folders are named .NAME.partial-PID@HOST-RANDOM (and a replaced checkpoint is moved to
# .NAME.old-PID@HOST for a moment), so a later run can tell which were left by dead processes.
_OWNER = re.compile(r"^(?P<pid>\d+)(?:@(?P<host>[A-Za-z0-9._]*))?(?:-\w+)?$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64]


def _owner_tag() -> str:
    return f"{os.getpid()}@{_host()}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid > 0
    return True


def clean_stale_staging(dst: Path) -> list[Path]:
    """Remove staging folders of dead conversions into ``dst`` (killed with SIGKILL, power
    loss); say so for those this run cannot judge. A checkpoint moved aside by an interrupted
    --overwrite is put back when ``dst`` is missing. Returns the folders removed."""
    parent = dst.absolute().parent
    if not parent.is_dir():
        return []
    removed = []
    for kind in ("partial", "old"):
        prefix = f".{dst.name}.{kind}-"
        try:
            entries = sorted(e for e in parent.iterdir() if e.name.startswith(prefix))
        except OSError:
            return removed
        for entry in entries:
            m = _OWNER.match(entry.name[len(prefix) :])
            if m is None:
                log.warning(
                    "%s was left by an interrupted conversion into %s (owner unknown); "
                    "delete it when no conversion is running",
                    entry,
                    dst,
                )
                continue
            pid, host = int(m["pid"]), m["host"]
            if host is not None and host != _host():
                log.warning(
                    "%s belongs to a conversion on host %s; delete it if that run is over",
                    entry,
                    host,
                )
                continue
            if _alive(pid):
                if pid != os.getpid():
                    log.warning(
                        "another conversion (process %d) is writing %s right now; the "
                        "one that finishes last wins",
                        pid,
                        dst,
                    )
                continue
            if kind == "old" and not dst.exists():
                entry.rename(dst)
                log.warning(
                    "restored %s from %s: an interrupted --overwrite (process %d) had "
                    "moved it aside",
                    dst,
                    entry.name,
                    pid,
                )
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
            log.warning(
                "removed %s, left by an interrupted conversion (process %d is gone)", entry, pid
            )
    return removed


def check_destination(dst: Path, overwrite: bool, src: str | Path | None = None) -> None:
    """Refuse a --dst that cannot receive the output, before any heavy work; clean up what
    earlier interrupted runs left next to it."""
    dst = Path(dst)
    if src is not None and Path(src).exists():
        s, d = Path(src).resolve(), dst.resolve()
        if s == d or d in s.parents:
            raise ConversionError(
                f"--dst {dst} overlaps --src {src}; writing there would "
                "replace the source: choose another --dst"
            )
        if s in d.parents:
            raise ConversionError(
                f"--dst {dst} is inside --src {src}; writing there would put a model folder "
                "into the source model: choose a --dst outside it"
            )
    probe = dst.absolute().parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConversionError(
            f"--dst {dst} cannot be created: {probe} is a file, not a folder; choose another --dst"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConversionError(
            f"--dst {dst} cannot be created: {probe} is not writable by this "
            "user (or is on a read-only file system); choose another --dst"
        )
    try:
        clean_stale_staging(dst)
    except OSError as exc:
        log.warning("could not tidy up next to %s: %s", dst, exc.strerror or exc)
    if dst.is_symlink() and not dst.exists():
        raise ConversionError(f"--dst {dst} is a broken symlink; remove it or choose another --dst")
    if dst.exists():
        if not dst.is_dir():
            raise ConversionError(f"--dst {dst} is a file, not a folder; choose another --dst")
        if any(dst.iterdir()) and not overwrite:
            raise ConversionError(
                f"--dst {dst} exists and is not empty; pass --overwrite to "
                "replace it or choose another folder"
            )


@contextmanager
def _signals_deferred() -> Iterator[list[int]]:
    """Hold SIGINT / SIGTERM / SIGHUP while the finished checkpoint is moved into place, so an
    interrupt cannot leave --dst moved aside; the caller re-raises afterwards."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    saved = {}
    for sig in INTERRUPT_SIGNALS:
        try:
            saved[sig] = signal.signal(sig, lambda signum, _frame: caught.append(signum))
        except (ValueError, OSError):
            pass
    try:
        yield caught
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _publish(tmp: Path, dst: Path) -> Path | None:
    """Move the finished staging folder to ``dst``; return what is left to delete."""
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp made it owner-only; a checkpoint is shared like a dir
    if not dst.exists():
        tmp.rename(dst)
        return None
    if _exchange(tmp, dst):
        return tmp  # now holds the replaced checkpoint
    old = dst.absolute().parent / f".{dst.name}.old-{_owner_tag()}"
    dst.rename(old)
    try:
        tmp.rename(dst)
    except OSError:
        old.rename(dst)
        raise
    return old


@contextmanager
def staging_folder(dst: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a sibling temp folder; on success it replaces ``dst``, on failure it is removed.

    SIGKILL leaves the staging folder behind; the next run into the same ``dst`` removes it.
    """
    check_destination(dst, overwrite)
    parent = dst.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-{_owner_tag()}-", dir=parent))
    except OSError as exc:
        raise ConversionError(
            f"cannot create the output next to --dst {dst}: "
            f"{exc.strerror or exc}; choose another --dst"
        ) from exc
    leftover = None
    try:
        yield tmp
        with _signals_deferred() as caught:
            leftover = _publish(tmp, dst)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConversionError(describe_os_error(exc, dst)) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if leftover is not None:
        if leftover.is_symlink():  # --dst was a symlink: the link itself was swapped out
            leftover.unlink()
        else:
            shutil.rmtree(leftover, ignore_errors=True)
    if caught:
        raise Interrupted(caught[0], committed=True)


def copy_verbatim(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in VERBATIM_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def copy_remote_code(dst: Path) -> None:
    here = Path(__file__).resolve().parent.parent / "remote_code" / "modeling_transmla.py"
    shutil.copy2(here, dst / "modeling_transmla.py")
