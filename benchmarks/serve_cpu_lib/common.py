"""Paths, logging, the workload of one pair and the engine variants it runs."""

from __future__ import annotations

import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
ENTRY = ROOT / "benchmarks" / "serve_cpu.py"
DOCS = ROOT / "docs" / "benchmarks.md"
MIB = 2**20


@dataclass(frozen=True)
class Workload:
    """One pair's settings; identical for every engine of the pair."""

    pair: str
    kv_cache_bytes: int
    prompt_len: int
    output_len: int
    num_requests: int
    ttft_reps: int = 3
    profile: bool = False
    dtype: str = "float32"


@dataclass(frozen=True)
class Variant:
    """One engine of a pair: which model of the pair, and its environment."""

    key: str  # results key
    label: str  # table label
    model: str  # "original" or "converted"
    env: tuple[tuple[str, str], ...] = ()


def variants(prefill: str) -> list[Variant]:
    """The engines of a pair for ``--prefill`` (both / fused / vllm)."""
    from transmla_vllm.cpu_prefill import CPU_PREFILL_ENV

    out = [Variant("original", "original", "original")]
    if prefill in ("both", "fused"):
        out.append(Variant("converted", "converted", "converted"))
    if prefill in ("both", "vllm"):
        out.append(
            Variant(
                "converted-vllm-prefill",
                "converted, vLLM's prefill",
                "converted",
                ((CPU_PREFILL_ENV, "0"),),
            )
        )
    return out


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], **kw: Any) -> None:
    log("$ " + shlex.join(cmd))
    subprocess.run(cmd, check=True, cwd=ROOT, **kw)
