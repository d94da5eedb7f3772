"""The stages a method is made of, each one step of converting one decoder layer.

A stage takes a ``LayerWork`` (work.py: the layer's inputs and target, what earlier stages
produced) and returns it with what it produced added, report entries included. Methods
(``methods.py``) are lists of stages, so a new step plugs in as a new stage in a list, with no
new branch in the code that runs them (``layer.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from converter.conversion.converted_layer import ConvertedRunner
from converter.conversion.source_layers import accumulate_gram, batched
from converter.conversion.work import (
    ConvertedAttention,
    FreqFold,
    LayerInputs,
    LayerTarget,
    LayerWork,
)
from converter.errors import ConversionError
from converter.math.assemble import GQAAttention, assemble_mla
from converter.math.assemble_normed import assemble_normed_mla
from converter.math.kv_pca import balanced_kv_basis
from converter.math.refit import ridge_refit
from converter.math.rorope import key_rotation, valid_freqfolds
from transmla_vllm.checkpoint_format import O_PROJ


def kv_statistics(work: LayerWork) -> LayerWork:
    """Second moment of [k; v] (after bias, before RoPE) over the training chunks, in fp64."""
    inputs = work.inputs
    attn, spec = inputs.layer.self_attn, inputs.spec
    gram = torch.zeros(
        2 * spec.kv_width, 2 * spec.kv_width, dtype=torch.float64, device=inputs.device
    )

    def add(h: torch.Tensor, _sl: slice) -> None:
        x = inputs.layer.input_layernorm(h)
        accumulate_gram(gram, torch.cat([source_keys(attn, x), attn.v_proj(x)], -1))

    batched(inputs.train, inputs.batch, inputs.device, add)
    return work.add(kv_gram=gram.cpu())


def source_keys(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The keys the conversion rotates and compresses: k_proj(x), or with a per-head k norm
    (Qwen3) the normalised keys of all KV heads, concatenated (method.md section 5)."""
    keys = attn.k_proj(x)
    norm = getattr(attn, "k_norm", None)
    if norm is None:
        return keys
    return norm(keys.unflatten(-1, (-1, attn.head_dim))).flatten(-2)


def _source_weights(layer: nn.Module) -> GQAAttention:
    attn = layer.self_attn

    def cpu(lin: nn.Linear, kind: str = "weight") -> torch.Tensor | None:
        t = getattr(lin, kind, None)
        return None if t is None else t.detach().to("cpu")  # assembly upcasts piece by piece

    cfg = attn.config
    return GQAAttention(
        cpu(attn.q_proj),
        cpu(attn.k_proj),
        cpu(attn.v_proj),
        cpu(attn.o_proj),
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        attn.head_dim,
        cpu(attn.q_proj, "bias"),
        cpu(attn.k_proj, "bias"),
        cpu(attn.v_proj, "bias"),
        *(cpu(getattr(attn, n)) if hasattr(attn, n) else None for n in ("q_norm", "k_norm")),
    )


def _build(
    inputs: LayerInputs, target: LayerTarget, gram: torch.Tensor, fold: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """RoRoPE rotation, balanced latent basis and DeepSeek-named weights for ``fold``."""
    spec = inputs.spec
    width = spec.kv_width
    rotation = key_rotation(
        gram[:width, :width], spec.num_kv_heads, spec.head_dim, target.rope_dim, fold
    )
    latent = balanced_kv_basis(gram, rotation.nope, target.kv_lora_rank)
    src = _source_weights(inputs.layer)
    build = assemble_mla if src.k_norm is None else assemble_normed_mla
    mla = build(src, rotation, latent, out_dtype=torch.float32)
    report = {
        "rope_key_energy": rotation.rope_energy_fraction,
        "latent_energy": latent.latent_energy_fraction,
        "key_scale": latent.key_scale,
        "freqfold": fold,
    }
    return mla, report


def _held_out_error(inputs: LayerInputs, runner: ConvertedRunner) -> float:
    """Relative error of the converted attention output against the source's, held-out chunks."""
    h = inputs.held_out
    num = den = 0.0
    for start in range(0, h.shape[0], inputs.batch):
        x = h[start : start + inputs.batch].to(inputs.device)
        want = inputs.source_attention(x)
        got = runner.attention(x)
        num += float((got - want).double().pow(2).sum())
        den += float(want.double().pow(2).sum())
    return num / max(den, 1e-30)


def choose_freqfold(work: LayerWork) -> LayerWork:
    """The given FreqFold, or the one with the least held-out attention error."""
    inputs, target = work.inputs, work.target
    if target.freqfold is not None:
        return work.add(freqfold=FreqFold(target.freqfold))
    if inputs.n_held_out == 0:
        raise ConversionError("--freqfold auto needs held-out calibration chunks")
    gram = work.need("kv_gram")
    scores = {}
    for fold in valid_freqfolds(inputs.spec.head_dim, target.rope_dim):
        mla, _ = _build(inputs, target, gram, fold)
        candidate = ConvertedAttention.build(mla, inputs, target)
        scores[fold] = _held_out_error(inputs, candidate.runner())
    return work.add(
        freqfold=FreqFold(min(scores, key=scores.get), scores),
        report={"freqfold_held_out_error": {str(k): v for k, v in scores.items()}},
    )


def assemble(work: LayerWork) -> LayerWork:
    """The closed-form MLA weights for the chosen FreqFold; refuse non-finite results."""
    inputs = work.inputs
    fold = work.need("freqfold").fold
    mla, built = _build(inputs, work.target, work.need("kv_gram"), fold)
    for name, tensor in mla.items():
        if not torch.isfinite(tensor).all():
            raise ConversionError(
                f"layer {inputs.index}: {name} came out non-finite; the source weights or "
                "calibration statistics are corrupt"
            )
    return work.add(attention=ConvertedAttention.build(mla, inputs, work.target), report=built)


@dataclass(frozen=True)
class RefitOProj:
    """Least-squares o_proj so the converted attention output matches a target on the
    training chunks. ``target`` "local": the source attention on the same inputs; "global":
    the source attention on the source stream plus the drift of the converted stream, so the
    refit also pulls the residual stream back toward the source."""

    target: str
    ridge: float = 1e-3

    def __call__(self, work: LayerWork) -> LayerWork:
        inputs, attention = work.inputs, work.need("attention")
        runner = attention.runner()
        o_weight = inputs.layer.self_attn.o_proj.weight
        width_in = o_weight.shape[1]
        f64 = torch.float64
        g_in = torch.zeros(width_in, width_in, dtype=f64, device=inputs.device)
        cross = torch.zeros(o_weight.shape[0], width_in, dtype=f64, device=inputs.device)
        target_energy = 0.0
        for start in range(0, inputs.n_train, inputs.batch):
            sl = slice(start, min(start + inputs.batch, inputs.n_train))
            h = inputs.h_in[sl].to(inputs.device)
            a = runner.attention_input_to_o(h)
            if self.target == "local" or inputs.stream == "source":
                y = inputs.source_attention(h)
            else:
                hs = inputs.h_src[sl].to(inputs.device)
                y = inputs.source_attention(hs) + (hs - h)
            accumulate_gram(g_in, a)
            accumulate_gram(cross, a, y)
            target_energy += float(y.double().pow(2).sum())
        fit = ridge_refit(g_in, cross, o_weight.detach(), self.ridge, target_energy)
        attention.set({O_PROJ: fit.weight})
        return work.add(report={"o_refit_rel_error": [fit.rel_error_before, fit.rel_error_after]})


def propagate_converted(work: LayerWork) -> LayerWork:
    """The converted stream entering the next layer (for methods calibrated on it)."""
    inputs, runner = work.inputs, work.need("attention").runner()
    return work.add(
        next_conv=batched(inputs.h_conv, inputs.batch, inputs.device, lambda h, _: runner.layer(h))
    )
