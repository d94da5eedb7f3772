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
# glibc's mallopt parameters (malloc.h) and the largest mmap threshold it takes on 64-bit
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MAX_MMAP_THRESHOLD = 32 << 20
KEEP_FREE_HEAP = 2**31 - 1  # bytes of free heap top glibc keeps before trimming (an int)
HEAP_GROWTH = 256 << 20  # extra bytes the heap grows by when it must


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


def keep_freed_memory() -> bool:
    """Let glibc keep freed blocks for reuse instead of handing them back to the OS at once.

    A training step frees and re-allocates the same activations every step. By default glibc
    serves large blocks with mmap and unmaps them on free (and trims a large free heap top), so
    every step pays the page faults again: healing SmolLM2 on 2 cores spent 23 s of 80 in the
    kernel and ran 1.31x slower (30 steps of 512 tokens; the same weights either way). Here
    blocks up to 32 MiB come from the heap and up to 2 GiB of free heap top stays mapped. Peak
    memory is unchanged; memory is just not returned between steps. False without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD) == 1
        ok = ok and libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREE_HEAP) == 1
        ok = ok and libc.mallopt(M_TOP_PAD, HEAP_GROWTH) == 1
    except (OSError, AttributeError):
        return False
    if ok:
        log.info("glibc malloc keeps freed blocks up to 32 MiB for reuse (no page faults per step)")
    return ok


def _status_bytes(field: str) -> int | None:
    """A memory line of Linux's /proc/self/status (kB there), in bytes; None without /proc."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """This process's resident memory now (0 where /proc is missing)."""
    return _status_bytes("VmRSS") or 0


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux's VmHWM, not ``ru_maxrss``: a process
    started by vfork + exec (Python's subprocess) inherits its parent's high-water mark in
    ``ru_maxrss``, so a conversion launched by a benchmark holding a model would report the
    benchmark's memory."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
