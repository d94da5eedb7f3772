"""The output folder: a staging folder renamed into place only when complete (so an interrupted
run never leaves a folder that looks like a finished checkpoint), plus the files copied into it."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from converter.errors import ConversionError

log = logging.getLogger(__name__)

# Files copied verbatim from the source: tokenizer, chat template, generation defaults, licence.
VERBATIM_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json", "LICENSE", "LICENSE.txt", "LICENSE.md",
)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a plain byte count -> bytes."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "B": 1}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


@contextmanager
def staging_folder(dst: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a sibling temp folder; on success it replaces ``dst``, on failure it is removed."""
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        if not overwrite:
            raise ConversionError(f"--dst {dst} exists and is not empty; pass --overwrite to "
                                  "replace it or choose another folder")
    parent = dst.parent.resolve()
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=parent))
    except OSError as exc:
        raise ConversionError(f"cannot write next to {dst}: {exc.strerror}") from exc
    try:
        yield tmp
        if dst.exists():
            old = parent / f".{dst.name}.old-{os.getpid()}"
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
