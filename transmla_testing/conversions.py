"""The conversion command the Shakespeare benchmarks share (quality, fp8_cache, heal,
loss_sources): calibrate on the comedies, fp32, any shape (--target hf), overwriting."""

from __future__ import annotations

import sys
from pathlib import Path

from transmla_testing.text import plays


def comedies_convert_cmd(src: Path, dst: Path, samples: int, *flags: str) -> list[str]:
    """``python -m converter`` for ``src`` -> ``dst`` with ``flags`` (shape, method) appended."""
    return [
        sys.executable,
        "-m",
        "converter",
        "--src",
        str(src),
        "--dst",
        str(dst),
        "--target",
        "hf",
        "--calib-text",
        str(plays("comedies")),
        "--calib-samples",
        str(samples),
        "--dtype",
        "float32",
        "--overwrite",
        *flags,
    ]
