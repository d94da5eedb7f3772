"""Convert one decoder layer: statistics, rotation, latent, assembly, optional o_proj refit,
and the hidden states the next layer is calibrated on."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from converter.conversion.blocked_mlp import use_blocked_mlp
from converter.conversion.methods import Method
from converter.conversion.settings import ResolvedSettings
from converter.conversion.source_layers import SourceLayers, accumulate_gram, batched
from converter.errors import ConversionError
from converter.math.assemble import GQAAttention, assemble_mla
from converter.math.kv_pca import balanced_kv_basis
from converter.math.refit import ridge_refit
from converter.math.rorope import key_rotation, valid_freqfolds
from converter.sources.base import SourceSpec
from transmla_vllm.checkpoint_format import DENSE_TENSORS, KV_A_BIAS, Q_BIAS

ATTN_ORDER = ("self_attn.q_proj.weight", Q_BIAS, "self_attn.kv_a_proj_with_mqa.weight",
              KV_A_BIAS, "self_attn.kv_b_proj.weight", "self_attn.o_proj.weight")


@dataclass
class LayerResult:
    tensors: dict[str, torch.Tensor]  # attention fp32, dense as stored; in writing order
    h_src: torch.Tensor
    h_conv: torch.Tensor | None
    report: dict = field(default_factory=dict)


def _source_attention(layer: nn.Module) -> GQAAttention:
    attn = layer.self_attn

    def cpu(lin: nn.Linear, kind: str = "weight") -> torch.Tensor | None:
        t = getattr(lin, kind, None)
        return None if t is None else t.detach().to("cpu")  # assembly upcasts piece by piece

    cfg = attn.config
    heads = cfg.num_attention_heads
    return GQAAttention(cpu(attn.q_proj), cpu(attn.k_proj), cpu(attn.v_proj), cpu(attn.o_proj),
                        heads, cfg.num_key_value_heads, attn.head_dim,
                        cpu(attn.q_proj, "bias"), cpu(attn.k_proj, "bias"),
                        cpu(attn.v_proj, "bias"))


def _converted_layer(layer: nn.Module, mla: dict[str, torch.Tensor], cfg, index: int,
                     device: str) -> nn.Module:
    """The converted decoder layer (our transformers remote code) with this layer's weights."""
    from converter.remote_code.modeling_transmla import TransMLADecoderLayer

    with torch.device("meta"):
        conv = TransMLADecoderLayer(cfg, index)
    state = {name: t.to(torch.float32) for name, t in mla.items()}  # no copy: already fp32
    for name in DENSE_TENSORS:
        state[name] = layer.state_dict()[name].detach()
    conv.load_state_dict(state, strict=True, assign=True)
    use_blocked_mlp(conv.mlp)  # the MLP weights are the source's, as stored
    return conv.to(device).eval()


def converted_rope_and_mask(cfg, seqlen: int, device: str) -> tuple[tuple, torch.Tensor]:
    """Rope tables and causal mask of the converted layers: the same for every layer."""
    from converter.remote_code.modeling_transmla import TransMLARotary

    positions = torch.arange(seqlen, device=device)[None]
    allowed = torch.ones(seqlen, seqlen, dtype=torch.bool, device=device).tril()
    mask = torch.zeros(seqlen, seqlen, device=device).masked_fill(
        ~allowed, torch.finfo(torch.float32).min)[None, None]
    return TransMLARotary(cfg)(positions), mask


class _ConvertedRunner:
    """Runs the converted layer on [B, T, D] batches with its rope and causal mask."""

    def __init__(self, conv: nn.Module, rope_and_mask: tuple[tuple, torch.Tensor]) -> None:
        self.conv = conv
        self.rope, self.mask = rope_and_mask

    def layer(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv(h, self.rope, self.mask, None)

    def attention_input_to_o(self, h: torch.Tensor) -> torch.Tensor:
        """What the converted attention feeds o_proj (per-head outputs, concatenated)."""
        captured = {}
        hook = self.conv.self_attn.o_proj.register_forward_pre_hook(
            lambda _m, args: captured.__setitem__("a", args[0]))
        try:
            self.conv.self_attn(self.conv.input_layernorm(h), self.rope, self.mask, None)
        finally:
            hook.remove()
        return captured["a"]


def _build(layer: nn.Module, spec: SourceSpec, kv_gram: torch.Tensor, rope_dim: int, rank: int,
           fold: int) -> tuple[dict[str, torch.Tensor], dict]:
    width = spec.kv_width
    rotation = key_rotation(kv_gram[:width, :width], spec.num_kv_heads, spec.head_dim, rope_dim,
                            fold)
    latent = balanced_kv_basis(kv_gram, rotation.nope, rank)
    mla = assemble_mla(_source_attention(layer), rotation, latent, out_dtype=torch.float32)
    report = {"rope_key_energy": rotation.rope_energy_fraction,
              "latent_energy": latent.latent_energy_fraction, "key_scale": latent.key_scale,
              "freqfold": fold}
    return mla, report


def _held_out_error(layer: nn.Module, runner: _ConvertedRunner, h: torch.Tensor, rope,
                    batch: int, device: str) -> float:
    """Relative error of the converted attention output against the source's on ``h``."""
    attn = layer.self_attn
    num = den = 0.0
    for start in range(0, h.shape[0], batch):
        x = h[start:start + batch].to(device)
        want = attn(hidden_states=layer.input_layernorm(x), attention_mask=None,
                    position_embeddings=rope)[0]
        got = runner.conv.self_attn(runner.conv.input_layernorm(x), runner.rope, runner.mask,
                                    None)
        num += float((got - want).double().pow(2).sum())
        den += float(want.double().pow(2).sum())
    return num / max(den, 1e-30)


def convert_layer(i: int, layers: SourceLayers, spec: SourceSpec, settings: ResolvedSettings,
                  method: Method, mla_config, h_src: torch.Tensor, h_conv: torch.Tensor | None,
                  batch: int, n_train: int | None = None) -> LayerResult:
    """Convert layer ``i``. Chunks [0, n_train) give statistics; the rest (held out) are only
    used to choose FreqFold per layer when it is "auto". ``h_src`` is overwritten with the
    next layer's source stream (returned as ``LayerResult.h_src``)."""
    device = layers.device
    layer = layers.layer(i)
    attn = layer.self_attn
    rope = layers.rope
    n_train = h_src.shape[0] if n_train is None else n_train
    h_in = h_conv if method.inputs == "converted" else h_src
    h_train, h_held = h_in[:n_train], h_in[n_train:]

    # 1. second moment of [k; v] (after bias, before RoPE) on the chosen stream
    kv_gram = torch.zeros(2 * spec.kv_width, 2 * spec.kv_width, dtype=torch.float64,
                          device=device)

    def stats(h: torch.Tensor, _sl: slice) -> None:
        x = layer.input_layernorm(h)
        accumulate_gram(kv_gram, torch.cat([attn.k_proj(x), attn.v_proj(x)], -1))

    batched(h_train, batch, device, stats)
    kv_gram = kv_gram.cpu()

    # 2. rotation, latent, assembly (fp64 math, fp32 results); FreqFold "auto": the best on
    # held-out chunks
    rope_and_mask = converted_rope_and_mask(mla_config, h_src.shape[1], device)
    if settings.freqfold is None:
        if h_held.shape[0] == 0:
            raise ConversionError("--freqfold auto needs held-out calibration chunks")
        scores = {}
        for fold in valid_freqfolds(spec.head_dim, settings.rope_dim):
            mla, _ = _build(layer, spec, kv_gram, settings.rope_dim, settings.kv_lora_rank, fold)
            runner = _ConvertedRunner(_converted_layer(layer, mla, mla_config, i, device),
                                      rope_and_mask)
            scores[fold] = _held_out_error(layer, runner, h_held, rope, batch, device)
        fold = min(scores, key=scores.get)
    else:
        fold, scores = settings.freqfold, None
    mla, report = _build(layer, spec, kv_gram, settings.rope_dim, settings.kv_lora_rank, fold)
    report = {"layer": i, **report}
    if scores:
        report["freqfold_held_out_error"] = {str(k): v for k, v in scores.items()}
    for name, tensor in mla.items():
        if not torch.isfinite(tensor).all():
            raise ConversionError(f"layer {i}: {name} came out non-finite; the source weights "
                                  "or calibration statistics are corrupt")

    # 3. optional o_proj refit, and the converted stream for the next layer
    next_conv = None
    if method.refit_o or method.inputs == "converted":
        conv = _converted_layer(layer, mla, mla_config, i, device)
        runner = _ConvertedRunner(conv, rope_and_mask)
        if method.refit_o:
            src_train = h_src[:n_train]
            conv_train = None if h_conv is None else h_conv[:n_train]
            mla["self_attn.o_proj.weight"] = _refit_o(layer, runner, method, src_train,
                                                      conv_train, batch, device, rope, report)
            # a new tensor, never copy_: before the refit the converted layer's o_proj IS the
            # source layer's (no copy on CPU), and writing into it would change the source
            # stream the next layer is calibrated on
            conv.self_attn.o_proj.weight = nn.Parameter(
                mla["self_attn.o_proj.weight"].to(device), requires_grad=False)
        if h_conv is not None:
            next_conv = batched(h_conv, batch, device, lambda h, _sl: runner.layer(h))
    # the next layer's source stream overwrites this one in place (nothing reads it after this:
    # at 128 chunks x 256 tokens that is 0.5 GB saved for hidden 4096, 1 GB for 8192)
    next_src = batched(h_src, batch, device,
                       lambda h, _sl: layer(h, attention_mask=None, position_embeddings=rope),
                       out=h_src)
    # dense tensors as stored (the MLP is still memory-mapped): the writer casts them
    dense = {name: t.detach().to("cpu")
             for name, t in layer.state_dict().items() if name in DENSE_TENSORS}
    tensors = {name: mla[name] for name in ATTN_ORDER if name in mla}
    tensors.update({name: dense[name] for name in DENSE_TENSORS})
    return LayerResult(tensors, next_src, next_conv, report)


def _refit_o(layer: nn.Module, runner: _ConvertedRunner, method: Method, h_src: torch.Tensor,
             h_conv: torch.Tensor | None, batch: int, device: str, rope, report: dict
             ) -> torch.Tensor:
    """Least-squares o_proj so the converted attention output matches the chosen target."""
    attn = layer.self_attn
    width_in = attn.o_proj.weight.shape[1]
    g_in = torch.zeros(width_in, width_in, dtype=torch.float64, device=device)
    cross = torch.zeros(attn.o_proj.weight.shape[0], width_in, dtype=torch.float64,
                        device=device)
    base = h_conv if (method.inputs == "converted" and h_conv is not None) else h_src
    target_energy = 0.0

    def src_attn(h: torch.Tensor) -> torch.Tensor:
        return attn(hidden_states=layer.input_layernorm(h), attention_mask=None,
                    position_embeddings=rope)[0]

    for start in range(0, base.shape[0], batch):
        sl = slice(start, start + batch)
        h = base[sl].to(device)
        a = runner.attention_input_to_o(h)
        if method.refit_o == "local" or base is h_src:
            y = src_attn(h)
        else:  # "global": the source stream's attention output plus the converted drift
            hs = h_src[sl].to(device)
            y = src_attn(hs) + (hs - h)
        accumulate_gram(g_in, a)
        accumulate_gram(cross, a, y)
        target_energy += float(y.double().pow(2).sum())
    fit = ridge_refit(g_in, cross, attn.o_proj.weight.detach(), method.ridge, target_energy)
    report["o_refit_rel_error"] = [fit.rel_error_before, fit.rel_error_after]
    report["refit_note"] = (f"; o_proj refit: relative error {fit.rel_error_before:.4f}"
                            f" -> {fit.rel_error_after:.4f}")
    return fit.weight.to("cpu", torch.float32, memory_format=torch.contiguous_format)
