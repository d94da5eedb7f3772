"""Write safetensors shards tensor by tensor, so memory holds one tensor, not one shard.

The safetensors library only writes whole dicts; for 70B-class outputs that would mean holding
gigabytes. Because every output shape is known before conversion starts, the shard layout and
headers are computed up front and tensor bytes are appended as layers finish. The files follow
the safetensors format exactly (8-byte little-endian header size, JSON header padded to 8 bytes,
then the raw little-endian data) and are read back with the safetensors library in tests.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from converter.errors import ConversionError
from transmla_vllm.checkpoint_format import INDEX_FILE, SINGLE_FILE

DTYPE_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
SPACE_MARGIN = 1 << 16  # config, report, card; the tokenizer copy may need more (caught then)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


@dataclass(frozen=True)
class TensorSlot:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


class StreamingShardWriter:
    """Writes ``plan`` (in order) into shards of at most ``max_bytes`` (one tensor may exceed)."""

    def __init__(self, folder: Path, plan: list[TensorSlot], max_bytes: int) -> None:
        self.folder, self.plan = folder, plan
        groups: list[list[TensorSlot]] = [[]]
        size = 0
        for slot in plan:
            if groups[-1] and size + slot.nbytes > max_bytes:
                groups.append([])
                size = 0
            groups[-1].append(slot)
            size += slot.nbytes
        count = len(groups)
        self.shard_names = [
            SINGLE_FILE if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            for i in range(count)
        ]
        self.shard_of = {s.name: i for i, g in enumerate(groups) for s in g}
        self.groups = groups
        self.total_bytes = sum(s.nbytes for s in plan)
        self._check_space()
        self.next = 0
        self.handle: BinaryIO | None = None
        self.open_shard = -1

    def _check_space(self) -> None:
        """Refuse now, not hours later, when the disk cannot hold the shards (shards already in
        the folder, from a run being resumed, count as written)."""
        try:
            free = shutil.disk_usage(self.folder).free
        except OSError:
            return
        present = sum(
            p.stat().st_size for name in self.shard_names if (p := self.folder / name).is_file()
        )
        need = max(self.total_bytes - present, 0) + SPACE_MARGIN
        if free < need:
            raise ConversionError(
                f"the converted weights need {_gb(need)} but only {_gb(free)} is free on the "
                f"disk of {self.folder.parent}; free some space or choose another --dst"
            )

    def _header(self, index: int) -> bytes:
        """Size prefix and JSON header of shard ``index`` (fixed by the plan)."""
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for slot in self.groups[index]:
            header[slot.name] = {
                "dtype": DTYPE_CODES[slot.dtype],
                "shape": list(slot.shape),
                "data_offsets": [offset, offset + slot.nbytes],
            }
            offset += slot.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw

    def _shard_bytes(self, index: int) -> int:
        return len(self._header(index)) + sum(s.nbytes for s in self.groups[index])

    def _start_shard(self, index: int) -> None:
        if self.handle is not None:
            self.handle.close()
        self.handle = open(self.folder / self.shard_names[index], "wb")  # noqa: SIM115
        self.handle.write(self._header(index))
        self.open_shard = index

    def resume_at(self, written: int) -> None:
        """Continue after the first ``written`` tensors of the plan: check the shards before
        are complete, cut the shard in progress back to the end of tensor ``written - 1`` and
        append from there; shards after it are removed (they are rewritten)."""
        if not 0 < written <= len(self.plan):
            raise ValueError(f"cannot resume after {written} of {len(self.plan)} tensors")
        done_names = {s.name for s in self.plan[:written]}
        current = self.shard_of[self.plan[written - 1].name]
        for index in range(current):
            path = self.folder / self.shard_names[index]
            if not path.is_file() or path.stat().st_size != self._shard_bytes(index):
                raise ConversionError(
                    f"{path} is missing or incomplete; the progress cannot be resumed"
                )
        group = self.groups[current]
        done = [slot for slot in group if slot.name in done_names]
        end = len(self._header(current)) + sum(slot.nbytes for slot in done)
        path = self.folder / self.shard_names[current]
        if not path.is_file() or path.stat().st_size < end:
            raise ConversionError(
                f"{path} is shorter than the progress file says; the progress cannot be resumed"
            )
        for later in self.shard_names[current + 1 :]:
            (self.folder / later).unlink(missing_ok=True)
        self.handle = open(path, "r+b")  # noqa: SIM115
        self.handle.truncate(end)
        self.handle.seek(end)
        self.open_shard = current
        self.next = written

    def flush(self) -> None:
        """Push everything written so far to the disk (before progress is recorded)."""
        if self.handle is not None:
            self.handle.flush()
            os.fsync(self.handle.fileno())

    def write(self, name: str, tensor: torch.Tensor) -> None:
        slot = self.plan[self.next]
        if name != slot.name or tuple(tensor.shape) != slot.shape or tensor.dtype != slot.dtype:
            raise RuntimeError(
                f"writer expected {slot} but got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        if self.shard_of[name] != self.open_shard:
            self._start_shard(self.shard_of[name])
        data = tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy()
        # an OSError (disk full, EFBIG) propagates: staging_folder removes the partial output
        # and turns it into one sentence naming --dst
        self.handle.write(memoryview(data))
        self.next += 1

    def close(self) -> list[str]:
        if self.next != len(self.plan):
            raise RuntimeError(f"only {self.next} of {len(self.plan)} tensors were written")
        if self.handle is not None:
            self.handle.close()
        if len(self.shard_names) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.plan)},
                "weight_map": {
                    s.name: self.shard_names[self.shard_of[s.name]]
                    for s in sorted(self.plan, key=lambda s: s.name)
                },
            }
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
        return list(self.shard_names)
