"""The heal tests' shared pair: built once per session, used by test_heal.py and
test_distributed.py (test_shared.py builds its own Qwen3 pair)."""

from __future__ import annotations

from pathlib import Path

import pytest

from converter.conversion.pipeline import ConvertOptions, convert
from transmla_testing.heal_rows import SEQLEN
from transmla_testing.models import make_model, teach


@pytest.fixture(scope="session")
def pair(tmp_path_factory, calib_file) -> tuple[Path, Path]:
    """A tiny LLaMA that learned the comedies, and its lossy conversion (rope 8 + latent 16 of
    the 64 KV elements)."""
    root = tmp_path_factory.mktemp("heal")
    src = make_model(root / "src", "llama", hidden=64, heads=4, kv_heads=2, head_dim=16, seed=5)
    teach(src, calib_file.read_text())
    student = convert(
        ConvertOptions(
            src=str(src),
            dst=str(root / "mla"),
            rope_dim=8,
            kv_lora_rank=16,
            calib_text=str(calib_file),
            calib_samples=8,
            calib_seqlen=SEQLEN,
        )
    )
    return src, student
