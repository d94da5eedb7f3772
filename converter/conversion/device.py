"""Where the conversion runs and how it keeps its memory: device choice, exact fp32 matmuls on
cuda, and giving each layer's memory back before the next one."""

from __future__ import annotations

import ctypes
import gc
import logging
import resource

import torch

from converter.checkpoint.source_reader import SourceReader
from converter.errors import ConversionError

log = logging.getLogger(__name__)


def pick_device(device: str) -> str:
    """'auto' -> cuda when torch sees one, else cpu; refuse cuda without a GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConversionError("--device cuda was asked for but torch sees no CUDA device")
    if device == "cuda":
        full_fp32_matmuls()
    return device


def full_fp32_matmuls() -> None:
    """Calibration needs true fp32 products on the GPU. TF32 (a 10-bit mantissa), which some
    CUDA images switch on for every process (TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1), would round
    the source model's rope angles (an outer product of positions and frequencies) by up to
    ~0.1 rad at position 255 and every projection by ~1e-3."""
    if torch.get_float32_matmul_precision() != "highest":  # cudnn's flag is on by default
        log.info(
            "calibration on cuda: TF32 matmuls turned off (precision was %r)",
            torch.get_float32_matmul_precision(),
        )
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False


def release_memory(reader: SourceReader) -> None:
    """Give this layer's memory back before the next one: unmap the source shards, collect,
    and ask glibc to return freed heap to the OS (else RSS creeps up with depth)."""
    reader.release()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux's VmHWM, not ``ru_maxrss``: a process
    started by vfork + exec (Python's subprocess) inherits its parent's high-water mark in
    ``ru_maxrss``, so a conversion launched by a benchmark holding a model would report the
    benchmark's memory."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
