"""Read a source checkpoint tensor by tensor, memory-mapped, without loading the model.

Supports a single ``model.safetensors`` or a sharded folder with
``model.safetensors.index.json``; bf16 / fp16 / fp32 tensors are returned as fp32 (or the
dtype asked for). Problems (missing shard, index naming a missing tensor, truncated file) become
ConversionErrors that name the file or tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from converter.errors import ConversionError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class SourceReader:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: dict[str, str] = {}  # tensor name -> file name
        self._handles: dict[str, object] = {}
        self._checked: set[str] = set()
        index = folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise ConversionError(f"{index} is not a valid safetensors index") from exc
            missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
            if missing:
                raise ConversionError(f"{folder} is missing shard(s) {missing} named by {INDEX}")
            self.files = dict(weight_map)
        elif (folder / SINGLE).is_file():
            self.files = {n: SINGLE for n in self._keys(SINGLE)}
        else:
            raise ConversionError(f"{folder} has no {SINGLE} or {INDEX} (only safetensors "
                                  "checkpoints are read)")

    def _open(self, file: str):
        if file not in self._handles:
            path = self.folder / file
            try:
                self._handles[file] = safe_open(str(path), framework="pt")
            except Exception as exc:  # safetensors raises its own error types
                raise ConversionError(f"{path} is not a readable safetensors file ({exc}); it "
                                      "may be truncated or corrupt: download it again") from exc
        return self._handles[file]

    def _keys(self, file: str) -> list[str]:
        return list(self._open(file).keys())

    def names(self) -> set[str]:
        return set(self.files)

    def has(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        file = self.files.get(name)
        if file is None:
            raise ConversionError(f"the source checkpoint has no tensor {name!r}")
        handle = self._open(file)
        if file not in self._checked:
            if name not in set(handle.keys()):
                raise ConversionError(f"{INDEX} maps {name!r} to {file}, which does not hold it")
            self._checked.add(file)
        try:
            tensor = handle.get_tensor(name)
        except Exception as exc:
            raise ConversionError(f"reading {name!r} from {file} failed ({exc}); the file may "
                                  "be truncated") from exc
        if not tensor.is_floating_point():
            raise ConversionError(f"tensor {name!r} has dtype {tensor.dtype}; quantized or "
                                  "integer checkpoints are not supported (dequantize first)")
        return tensor.to(dtype)

    def total_bytes(self) -> int:
        return sum((self.folder / f).stat().st_size for f in set(self.files.values()))
