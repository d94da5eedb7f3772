"""Conversions the benchmarks and tests share: the Shakespeare benchmarks' command (quality,
fp8_cache, heal, loss_sources: calibrate on the comedies, fp32, any shape, overwriting), the
heal command's arguments (benchmarks/heal.py and the heal tests), and the logit error against
rank that the exactness tests of every family check."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from transmla_testing.text import plays

if TYPE_CHECKING:
    import torch


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


def taught_conversion(
    root: Path, text_file: Path, seqlen: int, rope_dim: int, kv_lora_rank: int, **model
) -> tuple[Path, Path]:
    """(source, conversion): a tiny LLaMA (``make_model`` settings ``model``) that learned the
    text of ``text_file``, and its lossy conversion (``rope_dim`` + ``kv_lora_rank`` elements)
    calibrated on it: the pair the heal tests distil."""
    from converter.conversion.pipeline import ConvertOptions, convert
    from transmla_testing.models import make_model, teach

    src = make_model(root / "src", "llama", **model)
    teach(src, text_file.read_text())
    student = convert(
        ConvertOptions(
            src=str(src),
            dst=str(root / "mla"),
            rope_dim=rope_dim,
            kv_lora_rank=kv_lora_rank,
            calib_text=str(text_file),
            calib_samples=8,
            calib_seqlen=seqlen,
        )
    )
    return src, student


def heal_args(
    teacher: Path, student: Path, dst: Path, tokens: int, text: Path, *flags: str
) -> list[str]:
    """``converter heal`` arguments (after ``python -m converter``) for ``student`` -> ``dst``,
    trained on ``tokens`` of ``text``, with ``flags`` appended."""
    return [
        "heal",
        "--teacher",
        str(teacher),
        "--student",
        str(student),
        "--dst",
        str(dst),
        "--tokens",
        str(tokens),
        "--calib-text",
        str(text),
        *flags,
    ]


def logit_errors_by_rank(
    src: Path, work: Path, calib_file: Path, ranks: tuple[int, ...], rope_dim: int = 16
) -> list[float]:
    """Relative logit error of ``src`` converted at each latent rank (FreqFold 1, 8 x 64
    calibration tokens), against the source in transformers, on fixed random ids."""
    import torch
    from transformers import AutoModelForCausalLM

    from converter.conversion.pipeline import ConvertOptions, convert

    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    ids = torch.randint(3, 512, (2, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
    errors = []
    for rank in ranks:
        options = ConvertOptions(
            src=str(src),
            dst=str(work / f"r{rank}"),
            rope_dim=rope_dim,
            freqfold=1,
            kv_lora_rank=rank,
            calib_text=str(calib_file),
            calib_samples=8,
            calib_seqlen=64,
        )
        dst = convert(options)
        mla = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32, trust_remote_code=True)
        with torch.no_grad():
            errors.append(float((mla(ids).logits - want).norm() / want.norm()))
    return errors


def attention_inputs(src: Path, calib_file: Path) -> tuple[object, dict[int, torch.Tensor]]:
    """The source model and, per layer, its attention input (what k_proj reads) on the first
    8 x 64 calibration tokens of ``calib_file``, as the conversion's statistics see them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from converter.calibration.chunks import token_chunks
    from converter.calibration.text import read_calibration_text

    tok = AutoTokenizer.from_pretrained(src)
    chunks = token_chunks(tok, read_calibration_text(calib_file)[0], 8, 64)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    inputs = {}
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.k_proj.register_forward_hook(
            lambda m, args, out, i=i: inputs.__setitem__(i, args[0].detach())
        )
    with torch.no_grad():
        model(input_ids=chunks)
    return model, inputs
