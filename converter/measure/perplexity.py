"""Perplexity and source-vs-converted agreement, computed in transformers (fp32).

Text is tokenised once and cut into non-overlapping windows of ``ctx`` tokens (each starting
as the tokenizer starts text: calibration/chunks.py), up to ``max_tokens`` tokens in all, so
every model is scored on exactly the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from converter.calibration.chunks import body_length, text_rows
from converter.errors import ConversionError
from converter.measure import fp8_cache
from transmla_vllm.checkpoint_format import ARCHITECTURE


@dataclass(frozen=True)
class Agreement:
    ppl_source: float
    ppl_converted: float
    top1_agreement: float
    mean_kl: float
    tokens: int


# vLLM's --kv-cache-dtype names that eval / verify simulate (measure/fp8_cache.py)
KV_CACHE_DTYPES = tuple(fp8_cache.KV_CACHE_DTYPES)


def load_model(folder: str | Path, kv_cache_dtype: str = "auto", fp8_query: bool = True):
    """The model in fp32. A ``kv_cache_dtype`` other than "auto" makes a converted model
    simulate vLLM's fp8 latent cache (``fp8_query``: the absorbed query is quantized too, as
    FLASHMLA / FLASHINFER_MLA do): ``fp8_cache.simulate_fp8_cache``, docs/fp8_cache.md."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ConversionError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}")
    try:
        if kv_cache_dtype != "auto":
            config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
            if ARCHITECTURE not in (getattr(config, "architectures", None) or []):
                raise ConversionError(
                    f"--kv-cache-dtype {kv_cache_dtype} simulates the MLA latent cache: {folder} "
                    "is not a converted (TransMLA) folder"
                )
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, trust_remote_code=True
        ).eval()
    except (OSError, ValueError) as exc:
        raise ConversionError(f"could not load a model from {folder}: {exc}") from exc
    return fp8_cache.simulate_fp8_cache(model, kv_cache_dtype, fp8_query)


def windows(tokenizer, text: str, ctx: int, max_tokens: int) -> torch.Tensor:
    """[n, ctx] token windows covering the first ``max_tokens`` tokens of the text."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    body = body_length(tokenizer, ctx)
    count = min(len(ids), max_tokens) // body
    if count < 1:
        raise ConversionError(f"evaluation text has {len(ids)} tokens; need at least {body}")
    return text_rows(tokenizer, ids, ctx, count)


@torch.no_grad()
def perplexity(model, batch: torch.Tensor, desc: str = "perplexity") -> float:
    nll, count = 0.0, 0
    for row in tqdm(batch, desc=desc, unit="window", leave=False):
        logits = model(row[None], use_cache=False).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum"))
        count += row.numel() - 1
    return math.exp(nll / count)


@torch.no_grad()
def agreement(source, converted, batch: torch.Tensor) -> Agreement:
    """PPL of both, top-1 agreement and mean KL(source || converted) of next-token laws."""
    nll_s = nll_c = kl = 0.0
    agree = count = 0
    for row in tqdm(batch, desc="verify", unit="window", leave=False):
        ls = source(row[None], use_cache=False).logits[0, :-1].float().log_softmax(-1)
        lc = converted(row[None], use_cache=False).logits[0, :-1].float().log_softmax(-1)
        target = row[1:]
        nll_s -= float(ls.gather(-1, target[:, None]).sum())
        nll_c -= float(lc.gather(-1, target[:, None]).sum())
        kl += float((ls.exp() * (ls - lc)).sum())
        agree += int((ls.argmax(-1) == lc.argmax(-1)).sum())
        count += target.numel()
    return Agreement(
        math.exp(nll_s / count), math.exp(nll_c / count), agree / count, kl / count, count
    )
