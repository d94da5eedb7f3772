"""Qwen3 (per-head q/k RMSNorm) on a general random model: the energy figures the converter
logs are those of the normalised keys, measured independently from the written tensors, the
logit error falls as the latent rank grows, and the fp8-cache simulation runs the normed path."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from converter.conversion.pipeline import ConvertOptions, convert
from converter.measure import fp8_cache
from converter.measure.perplexity import load_model
from transmla_testing.conversions import attention_inputs, logit_errors_by_rank
from transmla_testing.models import edit_tensors, make_model

HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 4, 2, 16, 64
RANK, ROPE = 24, 8


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@torch.no_grad()
def test_energy_accounting_uses_the_normalised_keys(tmp_path, calib_file):
    src = make_model(tmp_path / "src", "qwen3", heads=HEADS, kv_heads=KV_HEADS, seed=3)
    dst = convert(
        ConvertOptions(
            src=str(src),
            dst=str(tmp_path / "dst"),
            rope_dim=ROPE,
            freqfold=2,
            kv_lora_rank=RANK,
            calib_text=str(calib_file),
            method="transmla",
            calib_samples=8,
            calib_seqlen=64,
        )
    )
    report = json.loads((dst / "transmla_report.json").read_text())["layers"]
    weights = load_file(str(dst / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["transmla"]["qk_norm"] == {"num_kv_heads": 2, "head_dim": 16, "eps": 1e-6}

    model, inputs = attention_inputs(src, calib_file)
    for i, layer in enumerate(model.model.layers):
        x = inputs[i].reshape(-1, HIDDEN).double()
        attn = layer.self_attn
        # independent: Qwen3's own per-head norm of the source keys
        k = (x @ attn.k_proj.weight.double().T).view(-1, KV_HEADS, HEAD_DIM)
        n = rms_norm(k, attn.k_norm.weight.double(), 1e-6).flatten(1)
        v = x @ attn.v_proj.weight.double().T
        pre = f"model.layers.{i}.self_attn."
        # the written normed path: the source k projection and norm are carried unchanged
        assert torch.equal(weights[pre + "k_head_proj.weight"], attn.k_proj.weight)
        assert torch.equal(weights[pre + "k_norm.weight"], attn.k_norm.weight)
        kv_a = (
            x @ weights[pre + "kv_a_proj_with_mqa.weight"].double().T
            + n @ weights[pre + "kv_a_key_map.weight"].double().T
        )
        latent, k_rope = kv_a[:, :RANK], kv_a[:, RANK:]
        rope_energy = float(k_rope.pow(2).sum() / n.pow(2).sum())
        nope = float(n.pow(2).sum() - k_rope.pow(2).sum())
        s = report[i]["key_scale"]
        latent_energy = float(latent.pow(2).sum()) / (nope / s**2 + float(v.pow(2).sum()))
        assert abs(report[i]["rope_key_energy"] - rope_energy) < 1e-5
        assert abs(report[i]["latent_energy"] - latent_energy) < 1e-5
        assert 0.2 < rope_energy < 0.999 and 0.2 < latent_energy < 0.999  # a non-trivial case


def _soften_queries(state: dict[str, torch.Tensor]) -> None:
    """Quarter the q norm weights: normalised queries and keys give sharp attention on random
    weights, and the test wants errors in the linear regime."""
    for name in state:
        if name.endswith("q_norm.weight"):
            state[name] = state[name] / 4


def test_logit_error_falls_as_rank_grows(tmp_path, calib_file):
    src = make_model(
        tmp_path / "src", "qwen3", heads=HEADS, kv_heads=KV_HEADS, seed=5, init=(0.1, 0.6, 0.6, 0.6)
    )  # gentle weights: errors stay in the linear regime
    edit_tensors(src, "model.safetensors", _soften_queries)
    errors = logit_errors_by_rank(src, tmp_path, calib_file, (4, 12, 28, 48))
    print("relative logit error by rank 4/12/28/48:", errors)
    assert errors == sorted(errors, reverse=True), errors
    assert errors[0] > 2 * errors[-1], errors


@torch.no_grad()
def test_fp8_cache_simulation_runs_the_normed_projections(tmp_path, calib_file, monkeypatch):
    """The fp8-cache simulation (eval/verify --kv-cache-dtype) on a Qwen3 conversion:
    it rounds, and with rounding switched off it is the ordinary normed forward."""
    src = make_model(tmp_path / "src", "qwen3", heads=HEADS, kv_heads=KV_HEADS, seed=3)
    dst = convert(
        ConvertOptions(
            src=str(src),
            dst=str(tmp_path / "dst"),
            rope_dim=ROPE,
            kv_lora_rank=RANK,
            freqfold=2,
            calib_text=str(calib_file),
            calib_samples=4,
            calib_seqlen=32,
        )
    )
    ids = torch.randint(3, 512, (1, 48), generator=torch.Generator().manual_seed(2))
    exact = load_model(dst)(ids).logits
    model = load_model(dst, "fp8_e4m3", True)
    rounded = model(ids).logits
    assert torch.isfinite(rounded).all()
    assert 1e-6 < float((rounded - exact).norm() / exact.norm()) < 0.2  # e4m3: 3 mantissa bits
    monkeypatch.setattr(fp8_cache, "fp8_round_trip", lambda x, fp8, scale=1.0: x)
    assert float((model(ids).logits - exact).norm() / exact.norm()) < 1e-5
