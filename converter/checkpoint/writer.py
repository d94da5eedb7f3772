"""Write a converted checkpoint: sharded safetensors + index, into a staging folder that is
renamed into place only when complete, so an interrupted run never leaves a folder that looks
like a finished checkpoint."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

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


class ShardedWriter:
    """Accumulate tensors and flush them to numbered shards of at most ``max_bytes``."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[dict[str, torch.Tensor] | list[str]] = []
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        index = len(self.shards)
        name = f"shard-{index:05d}.safetensors"
        try:
            save_file(self.pending, str(self.folder / name), metadata={"format": "pt"})
        except OSError as exc:
            raise ConversionError(f"writing {name} failed: {exc.strerror or exc}") from exc
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Flush the last shard, give shards their final names, write the index if sharded."""
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        files = []
        for i, names in enumerate(self.shards):
            final = ("model.safetensors" if count == 1
                     else f"model-{i + 1:05d}-of-{count:05d}.safetensors")
            (self.folder / f"shard-{i:05d}.safetensors").rename(self.folder / final)
            files.append(final)
            self.weight_map.update({n: final for n in names})
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": dict(sorted(self.weight_map.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return files


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
