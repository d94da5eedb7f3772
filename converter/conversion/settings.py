"""Conversion settings: the user's flags, checked and resolved against the source geometry."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from converter.errors import ConversionError
from converter.math.kv_pca import max_rank
from converter.math.rorope import check_rope_settings, default_freqfold, valid_freqfolds
from converter.sources.spec import SourceSpec
from transmla_vllm.backends import (
    FLASH_ATTN_PREFILL_SHAPES,
    MLA_HEAD_SIZES,
    gpu_prefill_rope,
    gpu_serving_problem,
    prefill_fits,
    what_serves_it,
)

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ResolvedSettings:
    rope_dim: int
    kv_lora_rank: int
    freqfold: int | None  # None: chosen per layer on held-out calibration data ("auto")
    out_dtype: str

    @property
    def freqfold_label(self) -> int | str:
        return "auto" if self.freqfold is None else self.freqfold


def check_calibration_sizes(samples: int, seqlen: int) -> None:
    """Refuse calibration sizes that cannot give a single chunk."""
    if samples < 1:
        raise ConversionError(f"--calib-samples {samples} must be at least 1")
    if seqlen < 2:
        raise ConversionError(
            f"--calib-seqlen {seqlen} must be at least 2 tokens (BOS plus one token of text)"
        )


# rope laws whose ``factor`` stretches the positions the model was trained on
_EXTENDING_ROPE_TYPES = ("linear", "llama3", "dynamic", "yarn")


def check_calibration_context(seqlen: int, spec: SourceSpec, flag: str = "--calib-seqlen") -> None:
    """Refuse sequences longer than the model's context: statistics from positions it never
    saw would steer the conversion. Where the rope scaling says the model reaches further than
    max_position_embeddings, go on with a note."""
    context = spec.max_position_embeddings
    if seqlen <= context:
        return
    params = spec.rope_parameters
    factor = params.get("factor")
    reach = context
    if params.get("rope_type") in _EXTENDING_ROPE_TYPES and factor:
        reach = max(context, int(params.get("original_max_position_embeddings", context) * factor))
    if seqlen <= reach:
        log.info(
            "%s %d is beyond max_position_embeddings %d; the %s rope scaling (factor %g) "
            "extends the context to %d tokens, so calibration goes on",
            flag,
            seqlen,
            context,
            params["rope_type"],
            factor,
            reach,
        )
        return
    raise ConversionError(
        f"{flag} {seqlen} is longer than the model's context ({context} tokens, "
        f"max_position_embeddings{'' if reach == context else f'; {reach} with its rope scaling'}"
        f"): statistics from positions the model never saw would mislead the conversion; use "
        f"{flag} {reach} or less"
    )


def check_vllm_servable(rank: int, rope: int, head_dim: int, target: str) -> None:
    """With ``--target vllm``, refuse a shape no GPU can serve as MLA (the prefill kernels of
    every NVIDIA GPU need rope 64; see transmla_vllm/backends.py); warn about the rest."""
    problem = gpu_serving_problem(rank, rope)
    if problem is not None:
        if target == "vllm":
            raise ConversionError(f"{problem}; {what_serves_it()}")
        log.warning("--target hf: %s (fine for transformers)", problem)
    if not prefill_fits(head_dim, FLASH_ATTN_PREFILL_SHAPES):
        log.warning(
            "head_dim %d is above the nope/v sizes of vLLM's GPU MLA prefill kernels with a "
            "rope key (at most 192): on NVIDIA GPUs serve with VLLM_MLA_DISABLE=1",
            head_dim,
        )


def _rope_options(head_dim: int, target: str) -> list[int]:
    """Even divisors of head_dim up to 64; with --target vllm only those a GPU prefill can
    serve (dividing 64, zero-padded to it at load)."""
    options = [r for r in range(2, min(64, head_dim) + 1, 2) if head_dim % r == 0]
    if target == "vllm":
        options = [r for r in options if gpu_prefill_rope(r) is not None]
    return options


def _auto_rope_dim(head_dim: int, elements: int, target: str) -> int:
    """Largest rope option that is <= a quarter of the budget: the rope key needs enough pairs
    for positions, the latent needs most of the budget for content."""
    options = _rope_options(head_dim, target)
    fitting = [r for r in options if 4 * r <= elements]
    return max(fitting) if fitting else min(options)


def _budget_elements(
    spec: SourceSpec, kv_budget: float | None, kv_elements: int | None, target: str
) -> int:
    if kv_budget is not None and kv_elements is not None:
        raise ConversionError("pass --kv-budget or --kv-elements, not both")
    if kv_budget is not None:
        if not 0 < kv_budget <= 1:
            raise ConversionError(f"--kv-budget {kv_budget} must be a fraction in (0, 1]")
        wanted = int(kv_budget * spec.kv_elements_per_token)
    else:
        wanted = int(kv_elements)
    if wanted < 2:
        raise ConversionError(f"a KV budget of {wanted} elements per token is too small")
    if target == "vllm":
        sizes = [n for n in MLA_HEAD_SIZES if n <= wanted]
        if not sizes:
            raise ConversionError(
                f"a budget of {wanted} elements per token per layer is below the smallest size "
                f"vLLM's MLA backends serve ({min(MLA_HEAD_SIZES)}); raise the budget, or "
                "pass --target hf for a free size (vLLM then zero-pads it at load)"
            )
        if sizes[-1] != wanted:
            log.info(
                "--target vllm: budget %d elements -> %d, the largest size vLLM's MLA "
                "backends serve without padding",
                wanted,
                sizes[-1],
            )
        return sizes[-1]
    return wanted


def resolve_settings(
    spec: SourceSpec,
    rope_dim: int | None,
    kv_lora_rank: int | None,
    freqfold: int | str | None,
    dtype: str | None,
    kv_budget: float | None = None,
    kv_elements: int | None = None,
    target: str = "vllm",
) -> ResolvedSettings:
    """Apply defaults and constraints; clip the rank with a notice; refuse impossible values.

    A budget (fraction of the source's KV elements, or an element count) picks rope dim and
    rank together; otherwise they come from --rope-dim (64) and --kv-lora-rank (512).
    """
    d = spec.head_dim
    budget = None
    if kv_budget is not None or kv_elements is not None:
        if kv_lora_rank is not None:
            raise ConversionError(
                "--kv-lora-rank and a KV budget both fix the latent rank; pass one of them"
            )
        budget = _budget_elements(spec, kv_budget, kv_elements, target)
    if rope_dim is not None:
        r = rope_dim
    elif budget is not None:
        r = _auto_rope_dim(d, budget, target)
        log.info(
            "rope dim %d chosen for a budget of %d elements (largest divisor of head_dim "
            "%d that is <= 64%s and <= budget/4)",
            r,
            budget,
            d,
            ", divides 64" if target == "vllm" else "",
        )
    else:
        r = max(_rope_options(d, target))
        if r != min(64, d):
            log.info(
                "rope dim %d: the largest divisor of head_dim %d that divides 64, the rope "
                "size vLLM's GPU prefill kernels serve (--target hf: any)",
                r,
                d,
            )
    # default: "auto", the best FreqFold per layer on held-out chunks (docs/benchmarks.md)
    if freqfold == "smallest":
        freqfold = default_freqfold(d, r)
    fold = None if freqfold in (None, "auto") else int(freqfold)
    try:
        check_rope_settings(d, r, fold if fold is not None else default_freqfold(d, r))
    except ValueError as exc:
        raise ConversionError(str(exc)) from exc
    if fold is None and len(valid_freqfolds(d, r)) == 1:
        fold = default_freqfold(d, r)  # nothing to choose between
    rank = budget - r if budget is not None else (512 if kv_lora_rank is None else kv_lora_rank)
    if rank < 1:
        raise ConversionError(f"--kv-lora-rank {rank} must be at least 1")
    limit = max_rank(spec.kv_width, r)
    if rank > limit:
        log.warning(
            "kv_lora_rank %d exceeds 2L - r = %d for this model (L = %d); clipped to "
            "%d, which keeps [K_nope; V] whole",
            rank,
            limit,
            spec.kv_width,
            limit,
        )
        rank = limit
    check_vllm_servable(rank, r, d, target)
    out = dtype or spec.torch_dtype
    if dtype is None and out == "float64":
        log.info("source weights are float64; writing float32 (pass --dtype to choose)")
        out = "float32"
    if out not in DTYPES:
        raise ConversionError(f"--dtype {out} is not one of {sorted(DTYPES)}")
    return ResolvedSettings(r, rank, fold, out)
