"""The convert command's options: the one home of their defaults (``--help`` shows them from
here, commands/options.py builds ConvertOptions from the parsed flags by field name)."""

from __future__ import annotations

from dataclasses import dataclass

from converter.calibration.text import TextOptions
from converter.conversion.methods import DEFAULT_METHOD


@dataclass
class ConvertOptions(TextOptions):
    """The convert command's options, as the user gave them (see ``--help``); the text options
    (calib_text, calib_jsonl, calib_field, calib_dataset, calib_chat) come from TextOptions."""

    src: str
    dst: str
    rope_dim: int | None = None  # None: 64, or head_dim if smaller
    kv_lora_rank: int | None = None  # None: 512, or what the KV budget leaves
    freqfold: int | str | None = None  # None or "auto": best per layer on held-out chunks
    kv_budget: float | None = None
    kv_elements: int | None = None
    target: str = "vllm"
    calib_samples: int = 128
    calib_seqlen: int = 256
    dtype: str | None = None  # None: the source's
    device: str = "auto"
    max_shard_size: str = "5GB"
    overwrite: bool = False
    revision: str | None = None
    method: str = DEFAULT_METHOD
    batch_size: int = 8  # calibration chunks per forward pass (no flag)
    resume: bool = False
    base_model: str | None = None  # Hub id of the source, for the card (a local --src has none)
