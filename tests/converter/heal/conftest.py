"""The heal tests' shared pair: built once per session, used by test_heal.py and
test_distributed.py (test_shared.py builds its own Qwen3 pair)."""

from __future__ import annotations

from pathlib import Path

import pytest

from transmla_testing.conversions import taught_conversion
from transmla_testing.heal_rows import SEQLEN


@pytest.fixture(scope="session")
def pair(tmp_path_factory, calib_file) -> tuple[Path, Path]:
    """A tiny LLaMA that learned the comedies, and its lossy conversion (rope 8 + latent 16 of
    the 64 KV elements)."""
    root = tmp_path_factory.mktemp("heal")
    geometry = dict(hidden=64, heads=4, kv_heads=2, head_dim=16, seed=5)
    return taught_conversion(root, calib_file, SEQLEN, 8, 16, **geometry)
