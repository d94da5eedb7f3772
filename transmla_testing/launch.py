"""How the tests and benchmarks start converter commands: the torchrun prefix for N ranks on
this machine, and a quiet timed run whose own report holds the details."""

from __future__ import annotations

import os
import subprocess
import sys
import time


def torchrun_args(ranks: int) -> list[str]:
    """``python`` arguments that launch the next module or script under torchrun with ``ranks``
    local processes (none for one rank: a plain process, no process group)."""
    if ranks <= 1:
        return []
    return ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]


def converter_cmd(args: list[str], ranks: int = 1) -> list[str]:
    """``python -m converter ...``, under torchrun when ``ranks`` > 1."""
    return [sys.executable, *torchrun_args(ranks), "-m", "converter", *args]


def run_quietly(cmd: list[str], threads: int | None = None) -> float:
    """Print the command, run it with its output discarded (each converter command records
    what it did in its report), raise on failure; its wall time in seconds. ``threads`` sets
    OMP_NUM_THREADS (ranks x threads = the cores)."""
    print("$", " ".join(str(c) for c in cmd[1:]), flush=True)
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.time() - started
