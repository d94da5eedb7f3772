"""The fp8 cache scales around heal.

A conversion folds power-of-two scales into each layer's latent so an fp8 cache stays inside
e4m3's range (math/fp8_scales.py: kv_a rows x 2^e, kv_b columns / 2^e). They are chosen for the
cache, not for training: AdamW's step is per parameter, so a kv_b column divided by 2^8 moves,
relative to its size, 256 times faster than an unscaled one, and the latent it multiplies is
256 times larger. heal takes them out before the first step (exact: powers of two) and, on the
weights it keeps, measures the cache's ranges again, chooses new scales, clamps them to what the
output dtype holds and folds them back in, so the written checkpoint's scales and the report's
ranges describe the healed weights.
"""

from __future__ import annotations

import logging
from dataclasses import fields

import torch

from converter.conversion.fp8_scaling import cache_maxima, scales_report
from converter.heal.distributed import full, like, local
from converter.math.fp8_scales import (
    CacheMaxima,
    Fp8Scales,
    apply_fp8_scales,
    choose_fp8_scales,
    fit_to_dtype,
)
from transmla_vllm.checkpoint_format import CONVERTED_ATTENTION, layer_prefix

log = logging.getLogger(__name__)
FIT_TOKENS = 16384  # training tokens the healed cache ranges are measured on


def recorded_scales(report: dict) -> list[Fp8Scales] | None:
    """The scales the conversion folded into each layer (from its report), or None when it
    folded none (the ``transmla`` method, or a report from before the fp8 stage)."""
    layers = report.get("layers") or []
    if not layers or any("fp8_scales" not in layer for layer in layers):
        return None
    return [
        Fp8Scales(layer["fp8_scales"]["latent_log2"], layer["fp8_scales"]["rope_pair_log2"])
        for layer in layers
    ]


def _larger(a: CacheMaxima, b: CacheMaxima) -> CacheMaxima:
    return CacheMaxima(
        *(torch.maximum(getattr(a, f.name), getattr(b, f.name)) for f in fields(CacheMaxima))
    )


def _attention(model, i: int) -> dict[str, torch.nn.Parameter]:
    params = dict(model.named_parameters())
    prefix = layer_prefix(i)
    return {n: params[prefix + n] for n in CONVERTED_ATTENTION if prefix + n in params}


@torch.no_grad()
def _fold(model, i: int, scales: Fp8Scales, inverse: bool) -> None:
    attn = model.model.layers[i].self_attn
    params = _attention(model, i)
    tensors = {n: full(p.detach()) for n, p in params.items()}  # whole, under torchrun too
    folded = apply_fp8_scales(tensors, scales, attn.num_heads, attn.nope_dim, inverse=inverse)
    for name, p in params.items():
        local(p).copy_(like(folded[name], p))


def unfold(model, scales: list[Fp8Scales]) -> None:
    """Take the conversion's scales out of every layer (in place, exact)."""
    for i, s in enumerate(scales):
        if not s.identity:
            _fold(model, i, s, inverse=True)
    largest = max((abs(e) for s in scales for e in (*s.latent, *s.rope)), default=0)
    if largest == 0:
        return
    log.info(
        "fp8 cache scales taken out for training (largest 2^%d); chosen again after it", largest
    )


@torch.no_grad()
def refold(model, rows: torch.Tensor, device: str, dtype: torch.dtype) -> list[dict]:
    """Measure each layer's cache ranges on ``rows`` (fp32), choose and fold new scales that the
    output ``dtype`` holds exactly; returns each layer's report entry."""
    layers = model.model.layers
    found: list[CacheMaxima | None] = [None] * len(layers)

    def hook(i: int):
        def record(module, args):
            seen = cache_maxima(module, [args[0]])
            prev = found[i]
            found[i] = seen if prev is None else _larger(prev, seen)

        return record

    handles = [layer.self_attn.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    was = model.training
    model.eval()
    try:
        for row in rows[: max(1, FIT_TOKENS // rows.shape[1])]:
            model.model(input_ids=row[None].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    entries = []
    for i, maxima in enumerate(found):
        attn = layers[i].self_attn
        tensors = {n: full(p.detach()).float().cpu() for n, p in _attention(model, i).items()}
        wanted = choose_fp8_scales(maxima)
        scales = fit_to_dtype(wanted, tensors, attn.num_heads, attn.nope_dim, dtype)
        if not scales.identity:
            _fold(model, i, scales, inverse=False)
        entries.append(scales_report(maxima, scales, wanted, dtype))
    return entries
