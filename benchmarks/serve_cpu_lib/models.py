"""The model pairs: the bundled SmolLM2-135M-Instruct and a random Llama with Llama-3-8B
attention, each with its conversion (made once, cached in the work dir)."""

from __future__ import annotations

import sys
from pathlib import Path

from serve_cpu_lib.common import log, run
from transmla_testing.text import plays
from transmla_vllm.checkpoint_format import CONFIG_FILE


def convert_cmd(src: Path, dst: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "converter",
        "--src",
        str(src),
        "--dst",
        str(dst),
        "--calib-text",
        str(plays("comedies")),
        "--calib-samples",
        "16",
        *extra,
        "--overwrite",
    ]


def prepare_smollm2(models: Path) -> tuple[Path, Path, list[str]]:
    src, dst = models / "SmolLM2-135M-Instruct", models / "smollm2-mla"
    cmd = convert_cmd(src, dst, "--kv-lora-rank", "256")
    if not (src / CONFIG_FILE).is_file():
        run([sys.executable, "-m", "converter.sources.bundled", "--dst", str(src)])
    if not (dst / CONFIG_FILE).is_file():
        run(cmd)
    return src, dst, cmd


def make_synthetic(folder: Path, layers: int, intermediate: int) -> None:
    """Random Llama with Llama-3-8B attention (llama3 rope included), reduced depth and MLP.

    Random weights are enough: the benchmark measures cache sizes and kernel time, not text.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from transmla_testing.models import make_tokenizer

    tok = make_tokenizer(folder, vocab_size=512)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=4096,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(folder)


def prepare_synthetic(models: Path, layers: int, intermediate: int) -> tuple[Path, Path, list[str]]:
    src = models / f"llama3-8b-attn-{layers}l-{intermediate}ff"
    dst = models / f"llama3-8b-attn-{layers}l-{intermediate}ff-mla"
    cmd = convert_cmd(src, dst, "--rope-dim", "64", "--kv-lora-rank", "512")
    if not (src / CONFIG_FILE).is_file():
        log(f"writing random model {src.name}")
        make_synthetic(src, layers, intermediate)
    if not (dst / CONFIG_FILE).is_file():
        run(cmd)
    return src, dst, cmd


def served_bytes_per_token(folder: Path, dtype: str = "float32") -> int:
    """KV bytes per token on vLLM CPU (the CPU_MLA row for a converted folder; AMX_MLA serves
    the same 512 + 64)."""
    import logging

    import torch

    from converter.measure.kv_cache import kv_budget

    logging.getLogger("converter.conversion.settings").setLevel(logging.ERROR)  # no preview notices
    b = kv_budget(folder, dtype=dtype, kv_memory=1, context=1)
    name = "CPU_MLA" if b.kind == "converted" else "original"
    row = next(r for r in b.rows if r.name == name)
    elem = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return row.elements_per_token_per_layer * b.layers * elem


def plan_requests(kv_bytes: int, per_token: list[int], seq_len: int, block: int = 16) -> int:
    """Requests that fill the largest of the caches (the other engines run them in waves)."""
    blocks = -(-seq_len // block)
    return max(kv_bytes // (b * block * blocks) for b in per_token)
