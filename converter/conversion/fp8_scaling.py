"""Stage: fold fp8-friendly power-of-two scales into a converted layer (math/fp8_scales.py).

Runs after the weights are final (closed form, refit, reconstruction): it measures what the
layer would cache on the training chunks, chooses the scales, clamps them to what the output
dtype holds exactly (``fit_to_dtype``: fp16's narrow range) and folds them in. The layer's
function is unchanged bit for bit in the output dtype; only where its values sit in e4m3's
range moves.
"""

from __future__ import annotations

import torch

from converter.conversion.work import LayerWork
from converter.math.fp8_scales import (
    CacheMaxima,
    Fp8Scales,
    apply_fp8_scales,
    choose_fp8_scales,
    fit_to_dtype,
)


@torch.no_grad()
def cache_maxima(attn: torch.nn.Module, inputs: list[torch.Tensor]) -> CacheMaxima:
    """Largest latent, rope-key pair, absorbed-query and query-rope-pair magnitudes of one of
    our remote-code attention modules over ``inputs`` (post-norm hidden states [B, T, D])."""
    rank, rope, nope = attn.rank, attn.rope_dim, attn.nope_dim
    w_uk = attn.kv_b_proj.weight.view(attn.num_heads, nope + attn.v_dim, rank)[:, :nope]
    latent = query = torch.zeros(rank, dtype=torch.float64)
    rope_key = rope_query = torch.zeros(rope // 2, dtype=torch.float64)
    for x in inputs:
        q, kv_a = attn.project(x)  # [B, T, H, nope + rope], [B, T, rank + rope]
        q_nope, q_pe = q.split([nope, rope], -1)
        c, k_pe = kv_a.split([rank, rope], -1)
        absorbed = torch.einsum("bthn,hnr->bthr", q_nope, w_uk)

        def peak(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
            return t.abs().amax(dims).double().cpu()

        latent = torch.maximum(latent, peak(c, (0, 1)))
        query = torch.maximum(query, peak(absorbed, (0, 1, 2)))
        rope_key = torch.maximum(rope_key, peak(k_pe.unflatten(-1, (-1, 2)).norm(dim=-1), (0, 1)))
        rope_query = torch.maximum(
            rope_query, peak(q_pe.unflatten(-1, (-1, 2)).norm(dim=-1), (0, 1, 2))
        )
    return CacheMaxima(latent, query, rope_key, rope_query)


def output_dtype(mla_config) -> torch.dtype:
    """The dtype the checkpoint is written in: the converted config's ``dtype`` (built from
    ``ResolvedSettings.out_dtype``); fp32, the dtype the stages compute in, when it has none."""
    dtype = getattr(mla_config, "dtype", None) or getattr(mla_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def scales_report(
    maxima: CacheMaxima, scales: Fp8Scales, requested: Fp8Scales, dtype: torch.dtype
) -> dict:
    """A layer's report entry: the folded exponents and the ranges before and after them;
    ``requested`` and the count when fit_to_dtype clamped some for the output ``dtype``."""

    def scaled_max(values: torch.Tensor, exponents: list[int], sign: int) -> float:
        factors = torch.tensor(exponents, dtype=torch.float64).mul(sign).exp2()
        return float((values * factors).max())

    entry = {
        "latent_log2": scales.latent,
        "rope_pair_log2": scales.rope,
        "max_before": {
            "latent": float(maxima.latent.max()),
            "absorbed_query": float(maxima.query.max()),
            "rope_key": float(maxima.rope_key.max()),
            "rope_query": float(maxima.rope_query.max()),
        },
        "max_after": {
            "latent": scaled_max(maxima.latent, scales.latent, 1),
            "absorbed_query": scaled_max(maxima.query, scales.latent, -1),
            "rope_key": scaled_max(maxima.rope_key, scales.rope, 1),
            "rope_query": scaled_max(maxima.rope_query, scales.rope, -1),
        },
    }
    clamped = sum(
        a != b
        for a, b in zip(requested.latent + requested.rope, scales.latent + scales.rope, strict=True)
    )
    if clamped:  # folding the requested exponents would not be exact in the output dtype
        entry.update(
            clamped_for=str(dtype).removeprefix("torch."),
            clamped=clamped,
            requested_latent_log2=requested.latent,
            requested_rope_pair_log2=requested.rope,
        )
    return entry


def fp8_scales(work: LayerWork) -> LayerWork:
    """Choose and fold in the layer's fp8 scales; report them (and the maxima)."""
    inputs, attention = work.inputs, work.need("attention")
    conv = attention.runner().conv
    # when batch does not divide n_train the last batch runs on into held-out chunks (the other
    # stages stop at n_train); left so, since changing it can change the chosen scales
    batches = (
        conv.input_layernorm(inputs.h_in[start : start + inputs.batch].to(inputs.device))
        for start in range(0, inputs.n_train, inputs.batch)
    )
    maxima = cache_maxima(conv.self_attn, batches)
    attn = conv.self_attn
    requested = choose_fp8_scales(maxima)
    dtype = output_dtype(work.target.mla_config)
    tensors = dict(attention.tensors)
    scales = fit_to_dtype(requested, tensors, attn.num_heads, attn.nope_dim, dtype)
    if not scales.identity:  # later stages run the scaled weights
        attention.set(apply_fp8_scales(tensors, scales, attn.num_heads, attn.nope_dim))
    return work.add(report={"fp8_scales": scales_report(maxima, scales, requested, dtype)})
