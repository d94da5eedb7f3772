"""Which source a converted checkpoint came from: a fingerprint of the source model, recorded
in the converted config's ``transmla`` block, so ``verify`` can refuse a pair that does not
belong together before any forward pass.

It holds the source's geometry and checksums of a few of its tensors as stored, not its path:
a moved or renamed source folder still matches, another model of the same shape does not.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from converter.checkpoint.source import read_config
from converter.checkpoint.source_reader import SourceReader
from converter.errors import ConversionError
from converter.sources.inspection import inspect_source
from converter.sources.spec import SourceSpec
from transmla_vllm.checkpoint_format import EMBED, FINAL_NORM, layer_prefix, transmla_block

# What is compared (cheap to read even for large models: 256 embedding rows, one layer's keys).
EMBED_ROWS = 256
KEY_TENSOR = layer_prefix(0) + "self_attn.k_proj.weight"
GEOMETRY = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")


def _checksum(tensor: torch.Tensor) -> str:
    raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()[:16]


def source_fingerprint(spec: SourceSpec, reader: SourceReader) -> dict[str, Any]:
    """Geometry plus checksums of the first embedding rows, layer 0's keys and the final norm."""
    return {
        "geometry": {k: getattr(spec, k) for k in GEOMETRY},
        "checksums": {
            f"{EMBED}[:{EMBED_ROWS}]": _checksum(reader.get(EMBED, dtype=None)[:EMBED_ROWS]),
            KEY_TENSOR: _checksum(reader.get(KEY_TENSOR, dtype=None)),
            FINAL_NORM: _checksum(reader.get(FINAL_NORM, dtype=None)),
        },
    }


def check_converted_from(src: Path, dst: Path) -> str | None:
    """Refuse when ``dst`` was not converted from the model in ``src``; return a note when it
    can only be checked by size (converted before fingerprints were recorded)."""
    converted = read_config(dst)
    block = transmla_block(converted)
    if not block:
        raise ConversionError(
            f"--dst {dst} is not a converted checkpoint (its config.json has no 'transmla' "
            "block); pass the converter's output folder"
        )
    spec = inspect_source(read_config(src))
    sizes = {
        "vocabulary": (spec.vocab_size, converted.get("vocab_size")),
        "hidden size": (spec.hidden_size, converted.get("hidden_size")),
        "layers": (spec.num_layers, converted.get("num_hidden_layers")),
    }
    differ = [f"{k} {a} vs {b}" for k, (a, b) in sizes.items() if a != b]
    if differ:
        raise ConversionError(
            f"--src {src} and --dst {dst} do not belong together ({', '.join(differ)} in --src "
            "vs --dst); pass the model --dst was converted from"
        )
    recorded = block.get("source_fingerprint")
    if not recorded:
        return (
            f"{dst} records no source fingerprint (converted by an older version): only the "
            "sizes of --src were checked against it"
        )
    reader = SourceReader(src, spec)
    try:
        found = source_fingerprint(spec, reader)
    finally:
        reader.release()
    if found != recorded:
        keys = [
            k
            for k in recorded.get("checksums", {})
            if found["checksums"].get(k) != recorded["checksums"][k]
        ]
        what = f"tensor(s) {', '.join(keys)} differ" if keys else "its geometry differs"
        raise ConversionError(
            f"--src {src} is not the model --dst {dst} was converted from ({what}; a moved or "
            "renamed copy of the right source would match): pass that model"
        )
    return None
