"""Read a source checkpoint tensor by tensor, memory-mapped, without loading the model.

Supports a single ``model.safetensors`` or a sharded folder with
``model.safetensors.index.json``; bf16 / fp16 / fp32 tensors are returned as fp32 (or the
dtype asked for). Every file header is read when the reader opens, so problems (missing shard,
index naming a missing tensor, truncated file, integer / fp8 tensors, tensors missing, extra or
shaped unlike config.json) become ConversionErrors that name the file or tensor before any
calibration or writing starts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from converter.errors import ConversionError
from converter.sources.spec import SourceSpec
from converter.sources.tensors import source_tensors
from transmla_vllm.checkpoint_format import IGNORED_SUFFIXES, INDEX_FILE, LM_HEAD, SINGLE_FILE

# safetensors dtype codes the converter reads (anything else is quantized or not a weight)
FLOAT_CODES = ("F16", "BF16", "F32", "F64")


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


class SourceReader:
    def __init__(self, folder: Path, spec: SourceSpec | None = None) -> None:
        self.folder = folder
        self.files: dict[str, str] = {}  # tensor name -> file name
        self._handles: dict[str, object] = {}
        self._checked: set[str] = set()
        self._finite: set[str] = set()  # tensors already checked for NaN / inf
        index = folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
                raise ConversionError(
                    f"{index} is not a valid safetensors index ({exc}); download it again"
                ) from exc
            missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
            if missing:
                raise ConversionError(
                    f"{folder} is missing shard(s) {_few(missing)} named by "
                    f"{INDEX_FILE}; the download is incomplete: download them"
                )
            self.files = dict(weight_map)
        elif (folder / SINGLE_FILE).is_file():
            self.files = {n: SINGLE_FILE for n in self._keys(SINGLE_FILE)}
        else:
            raise ConversionError(
                f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}; only "
                "safetensors checkpoints convert (re-save the model with "
                "save_pretrained(safe_serialization=True))"
            )
        self.headers = self._read_headers()
        spec = spec if spec is not None else self._spec_from_config()
        if spec is not None:
            self.check_against(spec)

    def _read_headers(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Open every file now (a truncated one fails here) and read dtype and shape of every
        tensor the index maps to it; nothing is read from the data sections."""
        headers: dict[str, tuple[str, tuple[int, ...]]] = {}
        by_file: dict[str, list[str]] = {}
        for name, file in self.files.items():
            by_file.setdefault(file, []).append(name)
        for file, names in sorted(by_file.items()):
            handle = self._open(file)
            held = set(handle.keys())
            ghosts = sorted(n for n in names if n not in held)
            if ghosts:
                raise ConversionError(
                    f"{INDEX_FILE} maps {_few(ghosts)} to {file}, which does not "
                    "hold them; the download is incomplete or the index is "
                    "stale: download the model again"
                )
            for name in names:
                part = handle.get_slice(name)
                headers[name] = (part.get_dtype(), tuple(part.get_shape()))
            self._checked.add(file)
        odd = sorted(n for n, (code, _) in headers.items() if code not in FLOAT_CODES)
        if odd:
            code = headers[odd[0]][0]
            raise ConversionError(
                f"tensor {odd[0]!r} has dtype {code}"
                f"{f' (like {len(odd) - 1} more)' if len(odd) > 1 else ''}; "
                "quantized or integer checkpoints are not supported: convert "
                "the bf16/fp16/fp32 original (or dequantize first)"
            )
        return headers

    def _spec_from_config(self) -> SourceSpec | None:
        from converter.checkpoint.source import read_config
        from converter.sources.inspection import inspect_source

        try:
            return inspect_source(read_config(self.folder))
        except ConversionError:
            return None  # the caller reports config problems itself

    def check_against(self, spec: SourceSpec) -> None:
        """Refuse a checkpoint whose tensors do not match its config.json."""
        want = source_tensors(spec)
        have = {
            n: s
            for n, (_, s) in self.headers.items()
            if not n.endswith(IGNORED_SUFFIXES) and not (spec.tie_word_embeddings and n == LM_HEAD)
        }
        missing = sorted(set(want) - set(have), key=_natural)
        if missing:
            hint = " (config.json has tie_word_embeddings false)" if LM_HEAD in missing else ""
            raise ConversionError(
                f"the source checkpoint lacks {len(missing)} tensor(s) its "
                f"config.json needs: {_few(missing)}{hint}; download the "
                "model again or fix config.json"
            )
        extra = sorted(set(have) - set(want), key=_natural)
        if extra:
            raise ConversionError(
                f"the source checkpoint has tensor(s) a {spec.family} model "
                f"with this config.json does not: {_few(extra)} (e.g. o_proj "
                "/ MLP biases or q/k norms); converting would drop them, so "
                "this model is not supported"
            )
        wrong = [n for n in sorted(want, key=_natural) if tuple(have[n]) != want[n]]
        if wrong:
            n = wrong[0]
            raise ConversionError(
                f"source tensor {n!r} has shape {tuple(have[n])} but "
                f"config.json implies {want[n]}"
                f"{f' ({len(wrong) - 1} more differ)' if len(wrong) > 1 else ''}"
                "; the checkpoint and its config.json do not match"
            )

    def _open(self, file: str):
        if file not in self._handles:
            path = self.folder / file
            try:
                self._handles[file] = safe_open(str(path), framework="pt")
            except Exception as exc:  # safetensors raises its own error types
                raise ConversionError(
                    f"{path} is not a readable safetensors file ({exc}); it "
                    "may be truncated or corrupt: download it again"
                ) from exc
        return self._handles[file]

    def _keys(self, file: str) -> list[str]:
        return list(self._open(file).keys())

    def names(self) -> set[str]:
        return set(self.files)

    def has(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """The tensor as ``dtype`` (None: as stored)."""
        file = self.files.get(name)
        if file is None:
            raise ConversionError(f"the source checkpoint has no tensor {name!r}")
        handle = self._open(file)
        if file not in self._checked:
            if name not in set(handle.keys()):
                raise ConversionError(
                    f"{INDEX_FILE} maps {name!r} to {file}, which does not hold it"
                )
            self._checked.add(file)
        try:
            tensor = handle.get_tensor(name)
        except Exception as exc:
            raise ConversionError(
                f"reading {name!r} from {file} failed ({exc}); the file may be truncated"
            ) from exc
        if not tensor.is_floating_point():
            raise ConversionError(
                f"tensor {name!r} has dtype {tensor.dtype}; quantized or "
                "integer checkpoints are not supported (dequantize first)"
            )
        if name not in self._finite:
            _check_finite(name, file, tensor)
            self._finite.add(name)
        return tensor if dtype is None else tensor.to(dtype)

    def release(self) -> None:
        """Close the memory maps. Pages of a mapped shard that were read stay resident (and
        count in RSS) while it is mapped; closing after each layer keeps memory flat in depth."""
        self._handles.clear()

    def total_bytes(self) -> int:
        return sum((self.folder / f).stat().st_size for f in set(self.files.values()))


def _check_finite(name: str, file: str, tensor: torch.Tensor, rows: int = 4096) -> None:
    """Refuse a tensor holding NaN or inf, naming it and counting them: the math downstream
    would fail far from the cause (an eigensolver that does not converge) or, for tensors it
    only copies, pass the damage on. Checked block by block, so a memory-mapped tensor never
    needs a full-size mask."""
    flat = tensor.reshape(tensor.shape[0], -1) if tensor.dim() > 1 else tensor.reshape(-1, 1)
    bad = sum(
        int((~torch.isfinite(flat[i : i + rows])).sum()) for i in range(0, flat.shape[0], rows)
    )
    if bad:
        raise ConversionError(
            f"source tensor {name!r} (in {file}) holds {bad:,} non-finite value(s) (NaN or inf) "
            f"of {tensor.numel():,}; the checkpoint is damaged: download it again or restore "
            "that file"
        )


def _natural(name: str) -> tuple:
    """Sort layer names by layer number (layers.2 before layers.10)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))
