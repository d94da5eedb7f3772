"""The stages a method is made of, each one step of converting one decoder layer.

A stage reads and extends a ``LayerWork`` (the layer, its calibration streams, what earlier
stages produced). Methods (``methods.py``) are lists of stages, so a new step plugs in as a new
stage in a list, with no new branch in the code that runs them (``layer.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from converter.conversion.converted_layer import ConvertedRunner, converted_layer
from converter.conversion.source_layers import accumulate_gram, batched
from converter.errors import ConversionError
from converter.math.assemble import GQAAttention, assemble_mla
from converter.math.assemble_normed import assemble_normed_mla
from converter.math.kv_pca import balanced_kv_basis
from converter.math.refit import ridge_refit
from converter.math.rorope import key_rotation, valid_freqfolds
from converter.sources.spec import SourceSpec
from transmla_vllm.checkpoint_format import O_PROJ


@dataclass
class LayerWork:
    """One layer in conversion: inputs (fixed) and what the stages add."""

    index: int
    layer: nn.Module  # the source decoder layer (transformers' own class)
    spec: SourceSpec
    rope_dim: int
    kv_lora_rank: int
    freqfold: int | None  # None: chosen on held-out chunks (then set by choose_freqfold)
    mla_config: Any  # DeepseekV3Config of the converted layers
    rope: tuple  # the source layer's rope tables
    conv_rope: tuple  # the converted layer's rope tables
    h_src: torch.Tensor  # source stream entering the layer [N, T, D]
    h_conv: torch.Tensor | None  # converted stream, for methods that carry it
    inputs: str  # "source" or "converted": the stream statistics come from
    n_train: int
    batch: int
    device: str
    # added by the stages
    kv_gram: torch.Tensor | None = None
    freqfold_scores: dict[int, float] | None = None
    mla: dict[str, torch.Tensor] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    next_conv: torch.Tensor | None = None
    _runner: ConvertedRunner | None = None

    @property
    def h_in(self) -> torch.Tensor:
        return self.h_conv if self.inputs == "converted" else self.h_src

    def runner(self) -> ConvertedRunner:
        """The converted layer with the assembled weights (built once, after assembly)."""
        if self._runner is None:
            conv = converted_layer(self.layer, self.mla, self.mla_config, self.index, self.device)
            self._runner = ConvertedRunner(conv, self.conv_rope)
        return self._runner

    def source_attention(self, h: torch.Tensor) -> torch.Tensor:
        """The source layer's attention output for residual stream ``h``."""
        x = self.layer.input_layernorm(h)
        return self.layer.self_attn(
            hidden_states=x, attention_mask=None, position_embeddings=self.rope
        )[0]


class Stage(Protocol):
    def __call__(self, work: LayerWork) -> None: ...


def kv_statistics(work: LayerWork) -> None:
    """Second moment of [k; v] (after bias, before RoPE) over the training chunks, in fp64."""
    attn, spec = work.layer.self_attn, work.spec
    gram = torch.zeros(
        2 * spec.kv_width, 2 * spec.kv_width, dtype=torch.float64, device=work.device
    )

    def add(h: torch.Tensor, _sl: slice) -> None:
        x = work.layer.input_layernorm(h)
        accumulate_gram(gram, torch.cat([source_keys(attn, x), attn.v_proj(x)], -1))

    batched(work.h_in[: work.n_train], work.batch, work.device, add)
    work.kv_gram = gram.cpu()


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


def _build(work: LayerWork, fold: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """RoRoPE rotation, balanced latent basis and DeepSeek-named weights for ``fold``."""
    spec, gram = work.spec, work.kv_gram
    width = spec.kv_width
    rotation = key_rotation(
        gram[:width, :width], spec.num_kv_heads, spec.head_dim, work.rope_dim, fold
    )
    latent = balanced_kv_basis(gram, rotation.nope, work.kv_lora_rank)
    src = _source_weights(work.layer)
    build = assemble_mla if src.k_norm is None else assemble_normed_mla
    mla = build(src, rotation, latent, out_dtype=torch.float32)
    report = {
        "rope_key_energy": rotation.rope_energy_fraction,
        "latent_energy": latent.latent_energy_fraction,
        "key_scale": latent.key_scale,
        "freqfold": fold,
    }
    return mla, report


def _held_out_error(work: LayerWork, runner: ConvertedRunner) -> float:
    """Relative error of the converted attention output against the source's, held-out chunks."""
    h = work.h_in[work.n_train :]
    num = den = 0.0
    for start in range(0, h.shape[0], work.batch):
        x = h[start : start + work.batch].to(work.device)
        want = work.source_attention(x)
        got = runner.attention(x)
        num += float((got - want).double().pow(2).sum())
        den += float(want.double().pow(2).sum())
    return num / max(den, 1e-30)


def choose_freqfold(work: LayerWork) -> None:
    """Keep the given FreqFold, or pick the one with the least held-out attention error."""
    if work.freqfold is not None:
        return
    if work.h_in.shape[0] == work.n_train:
        raise ConversionError("--freqfold auto needs held-out calibration chunks")
    scores = {}
    for fold in valid_freqfolds(work.spec.head_dim, work.rope_dim):
        mla, _ = _build(work, fold)
        conv = converted_layer(work.layer, mla, work.mla_config, work.index, work.device)
        scores[fold] = _held_out_error(work, ConvertedRunner(conv, work.conv_rope))
    work.freqfold, work.freqfold_scores = min(scores, key=scores.get), scores


def assemble(work: LayerWork) -> None:
    """The closed-form MLA weights for the chosen FreqFold; refuse non-finite results."""
    work.mla, built = _build(work, work.freqfold)
    work.report.update(built)
    if work.freqfold_scores:
        work.report["freqfold_held_out_error"] = {
            str(k): v for k, v in work.freqfold_scores.items()
        }
    for name, tensor in work.mla.items():
        if not torch.isfinite(tensor).all():
            raise ConversionError(
                f"layer {work.index}: {name} came out non-finite; the source weights or "
                "calibration statistics are corrupt"
            )


@dataclass(frozen=True)
class RefitOProj:
    """Least-squares o_proj so the converted attention output matches a target on the
    training chunks. ``target`` "local": the source attention on the same inputs; "global":
    the source attention on the source stream plus the drift of the converted stream, so the
    refit also pulls the residual stream back toward the source."""

    target: str
    ridge: float = 1e-3

    def __call__(self, work: LayerWork) -> None:
        runner = work.runner()
        o_weight = work.layer.self_attn.o_proj.weight
        width_in = o_weight.shape[1]
        f64 = torch.float64
        g_in = torch.zeros(width_in, width_in, dtype=f64, device=work.device)
        cross = torch.zeros(o_weight.shape[0], width_in, dtype=f64, device=work.device)
        base = work.h_in
        target_energy = 0.0
        for start in range(0, work.n_train, work.batch):
            sl = slice(start, min(start + work.batch, work.n_train))
            h = base[sl].to(work.device)
            a = runner.attention_input_to_o(h)
            if self.target == "local" or base is work.h_src:
                y = work.source_attention(h)
            else:
                hs = work.h_src[sl].to(work.device)
                y = work.source_attention(hs) + (hs - h)
            accumulate_gram(g_in, a)
            accumulate_gram(cross, a, y)
            target_energy += float(y.double().pow(2).sum())
        fit = ridge_refit(g_in, cross, o_weight.detach(), self.ridge, target_energy)
        weight = fit.weight.to("cpu", torch.float32, memory_format=torch.contiguous_format)
        work.mla[O_PROJ] = weight
        # a new Parameter, never copy_: before the refit the converted layer's o_proj IS the
        # source layer's (no copy on CPU), and writing into it would change the source stream
        # the next layer is calibrated on
        runner.conv.self_attn.o_proj.weight = nn.Parameter(
            weight.to(work.device), requires_grad=False
        )
        work.report["o_refit_rel_error"] = [fit.rel_error_before, fit.rel_error_after]
        work.report["refit_note"] = (
            f"; o_proj refit: relative error {fit.rel_error_before:.4f}"
            f" -> {fit.rel_error_after:.4f}"
        )


def propagate_converted(work: LayerWork) -> None:
    """The converted stream entering the next layer (for methods calibrated on it)."""
    runner = work.runner()
    work.next_conv = batched(work.h_conv, work.batch, work.device, lambda h, _sl: runner.layer(h))
