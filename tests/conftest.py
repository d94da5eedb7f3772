from __future__ import annotations

from pathlib import Path

import pytest

from converter.conversion.pipeline import ConvertOptions, convert
from transmla_testing.models import make_model
from transmla_testing.text import play_text


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "comedy.txt"
    path.write_text(play_text("twelfth-night") + play_text("as-you-like-it"))
    return path


LLAMA = dict(
    family="llama",
    heads=4,
    kv_heads=2,
    head_dim=64,
    hidden=128,
    tied=True,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
)
QWEN2 = dict(family="qwen2", heads=4, kv_heads=2, head_dim=64, hidden=128, tied=False)


@pytest.fixture(scope="session")
def converted(tmp_path_factory, calib_file):
    """Compact checkpoints (latent 96 + rope 64 = 160, padded to 576 at load on CPU)."""
    root = tmp_path_factory.mktemp("parity")
    out = {}
    for name, kw in (("llama", LLAMA), ("qwen2", QWEN2)):
        src = make_model(root / f"{name}-src", seed=11, **kw)
        out[name] = convert(
            ConvertOptions(
                src=str(src),
                dst=str(root / f"{name}-mla"),
                rope_dim=64,
                kv_lora_rank=96,
                calib_text=str(calib_file),
                calib_samples=8,
                calib_seqlen=64,
            )
        )
    return out
