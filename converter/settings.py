"""Conversion settings: the user's flags, checked and resolved against the source geometry."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from converter.errors import ConversionError
from converter.math.kv_pca import max_rank
from converter.math.rorope import check_rope_settings, default_freqfold
from converter.sources.base import SourceSpec

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# rho + r sizes vLLM's MLA backends accept; smaller latents are zero-padded up at load time.
VLLM_LATENT_SIZES = (320, 512, 576)


@dataclass(frozen=True)
class ResolvedSettings:
    rope_dim: int
    kv_lora_rank: int
    freqfold: int
    out_dtype: str


def resolve_settings(spec: SourceSpec, rope_dim: int | None, kv_lora_rank: int,
                     freqfold: int | None, dtype: str | None) -> ResolvedSettings:
    """Apply defaults and constraints; clip the rank with a notice; refuse impossible values."""
    d = spec.head_dim
    r = rope_dim if rope_dim is not None else min(64, d)
    try:
        check_rope_settings(d, r, freqfold if freqfold is not None else default_freqfold(d, r))
    except ValueError as exc:
        raise ConversionError(str(exc)) from exc
    f = freqfold if freqfold is not None else default_freqfold(d, r)
    if freqfold is None:
        log.info("freqfold %d chosen: the smallest value allowed for head_dim %d and rope dim "
                 "%d (least frequency mixing)", f, d, r)
    if kv_lora_rank < 1:
        raise ConversionError(f"--kv-lora-rank {kv_lora_rank} must be at least 1")
    limit = max_rank(spec.kv_width, r)
    rank = kv_lora_rank
    if rank > limit:
        log.warning("--kv-lora-rank %d exceeds 2L - r = %d for this model (L = %d); clipped to "
                    "%d, which keeps [K_nope; V] whole", rank, limit, spec.kv_width, limit)
        rank = limit
    if rank + r > max(VLLM_LATENT_SIZES):
        log.warning("latent + rope = %d exceeds %d: no vLLM MLA backend can serve it, even "
                    "padded; serve with VLLM_MLA_DISABLE=1 (full KV cost) or lower the ranks",
                    rank + r, max(VLLM_LATENT_SIZES))
    out = dtype or spec.torch_dtype
    if out not in DTYPES:
        raise ConversionError(f"--dtype {out} is not one of {sorted(DTYPES)}")
    return ResolvedSettings(r, rank, f, out)
