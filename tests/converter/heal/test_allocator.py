"""keep_freed_memory: freed activations stay mapped for the next training step. By default glibc
hands large freed blocks straight back to the OS, so each step page-faults them in again (heal on
SmolLM2 spent 23 s of 80 in the kernel); after the call the same free leaves RSS in place."""

from __future__ import annotations

import json
import subprocess
import sys

BLOCKS, BLOCK_MB = 64, 8  # a step's worth of activations: 512 MiB in blocks of 8 MiB

PROBE = f"""
import json, sys
import torch
from converter.conversion.device import keep_freed_memory, rss_bytes
tuned = sys.argv[1] == "tuned" and keep_freed_memory()
blocks = [torch.ones({BLOCK_MB} << 18) for _ in range({BLOCKS})]  # fp32: 4 bytes each, touched
full = rss_bytes()
del blocks
print(json.dumps({{"tuned": tuned, "returned_mb": (full - rss_bytes()) / 2**20}}))
"""


def returned_mb(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_blocks_stay_mapped_after_keep_freed_memory():
    default, tuned = returned_mb("default"), returned_mb("tuned")
    assert tuned["tuned"] is True
    total = BLOCKS * BLOCK_MB
    assert default["returned_mb"] > 0.8 * total  # glibc's default gives the blocks back at once
    assert tuned["returned_mb"] < 0.1 * total  # kept for the next step's allocations
