"""The healed folder: the student's format unchanged (same tensors, shapes, dtype and shard
size rule), its tokenizer and card metadata kept, the heal settings and figures added to the
config's ``transmla`` block, the report and the card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from converter.checkpoint.stream_writer import StreamingShardWriter, TensorSlot
from converter.checkpoint.writer import copy_remote_code, copy_verbatim
from converter.conversion.settings import DTYPES
from converter.errors import ConversionError
from converter.heal.distributed import SINGLE, Launch, full
from converter.heal.plot import write_plot
from converter.hub.card import refresh_model_card
from transmla_vllm.checkpoint_format import CARD_FILE, CONFIG_FILE, REPORT_FILE, CheckpointLayout

# figures about the student that no longer describe the healed model
STALE_REPORT_KEYS = ("verification",)


def write_healed(
    folder: Path | None,
    student: Path,
    config: dict[str, Any],
    model,
    heal: dict[str, Any],
    max_shard_bytes: int,
    fp8_scales: list[dict] | None = None,
    launch: Launch = SINGLE,
) -> list[str]:
    """Write the healed model into ``folder``; returns the shard names. ``fp8_scales``: each
    layer's new fp8 scale entry (heal/fp8.py), replacing the conversion's in the report. Under
    torchrun every rank calls it (each tensor is gathered whole, one at a time, a collective)
    and rank 0 alone writes; the others pass ``folder`` None and get no names."""
    dtype = DTYPES.get(str(config.get("dtype")), None)
    state = model.state_dict()
    layout = CheckpointLayout.from_config(config)
    if dtype is None:  # an older config without dtype: keep what the student stored
        dtype = state[next(iter(layout.tensors()))].dtype
    slots = [TensorSlot(n, s, dtype) for n, s in layout.tensors().items()]
    writer = StreamingShardWriter(folder, slots, max_shard_bytes) if launch.main else None
    for slot in slots:
        whole = full(state[slot.name].detach())
        if writer is not None:
            writer.write(slot.name, whole.to("cpu", dtype))
    if writer is None or folder is None:
        return []
    shards = writer.close()
    healed = json.loads(json.dumps(config))
    healed["transmla"]["heal"] = heal["settings"]
    (folder / CONFIG_FILE).write_text(json.dumps(healed, indent=2) + "\n")
    copy_verbatim(student, folder)
    copy_remote_code(folder)
    report_path = student / REPORT_FILE
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    for key in STALE_REPORT_KEYS:
        report.pop(key, None)
    report["shards"] = shards
    heal["plot"] = write_plot(folder, heal)
    report["heal"] = heal
    if fp8_scales is not None:
        for layer, entry in zip(report.get("layers") or [], fp8_scales, strict=True):
            layer["fp8_scales"] = {**entry, "chosen": "after heal, on the healed weights"}
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    if (student / CARD_FILE).is_file():  # its metadata (license, base model) is kept
        shutil.copy2(student / CARD_FILE, folder / CARD_FILE)
    refresh_model_card(folder)
    return shards


def input_weights(student: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The student's own tensors ``names`` as stored (what heal writes when it keeps the input)."""
    from safetensors import safe_open

    wanted, out = set(names), {}
    for shard in sorted(student.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            out.update({n: f.get_tensor(n) for n in f.keys() if n in wanted})
    missing = wanted - set(out)
    if missing:
        raise ConversionError(f"{student} lacks {sorted(missing)[0]} (and {len(missing) - 1} more)")
    return out
