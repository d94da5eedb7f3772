"""fp8-friendly scales (issue 14, item 3): exact in fp32, and they rescue a saturating cache.

Any power-of-two fold leaves fp32 logits bit for bit. A source made loud (v_proj x 512,
o_proj / 512: the same function) converts to a latent far past e4m3's 448; the conversion's
scales must bring the fp8 simulation's error back to that of the quiet source, and the same
checkpoint with the scales taken out (what vLLM would store without the stage) must lose far
more. Errors are measured against the model's own unquantized logits.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from converter.conversion.fp8_scaling import cache_maxima
from converter.conversion.pipeline import ConvertOptions, convert
from converter.math.fp8_scales import (
    E4M3_MAX,
    HEADROOM,
    Fp8Scales,
    apply_fp8_scales,
    choose_fp8_scales,
)
from converter.measure.perplexity import load_model
from transmla_testing.models import edit_tensors, make_model
from transmla_vllm.checkpoint_format import (
    CONFIG_FILE,
    KV_B_PROJ,
    REPORT_FILE,
    SINGLE_FILE,
    layer_prefix,
)

LOUD = 2.0**9  # v_proj times this, o_proj divided by it: the same source function


def _convert(src, out, calib_file) -> None:
    convert(
        ConvertOptions(
            src=str(src),
            dst=str(out),
            rope_dim=16,
            kv_lora_rank=48,
            calib_text=str(calib_file),
            calib_samples=8,
            calib_seqlen=64,
        )
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory, calib_file):
    """A tiny Qwen2 converted as is, and the same source made loud (latent far past 448)."""
    root = tmp_path_factory.mktemp("fp8scales")
    src = make_model(root / "src", family="qwen2", heads=4, kv_heads=2, head_dim=32, hidden=96)
    loud = root / "loud-src"
    shutil.copytree(src, loud)

    def louder(state: dict[str, torch.Tensor]) -> None:
        for name in list(state):
            if name.endswith(("v_proj.weight", "v_proj.bias")):
                state[name] = state[name] * LOUD
            elif name.endswith("o_proj.weight"):
                state[name] = state[name] / LOUD

    edit_tensors(loud, SINGLE_FILE, louder)
    _convert(src, root / "mla", calib_file)
    _convert(loud, root / "loud-mla", calib_file)
    return root / "mla", root / "loud-mla"


def _chosen(folder) -> list[Fp8Scales]:
    layers = json.loads((folder / REPORT_FILE).read_text())["layers"]
    return [
        Fp8Scales(r["fp8_scales"]["latent_log2"], r["fp8_scales"]["rope_pair_log2"]) for r in layers
    ]


def _refold(folder, out, per_layer: list[Fp8Scales], inverse: bool):
    """Copy ``folder`` to ``out`` with each layer's scales folded in (or taken out)."""
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    shutil.copytree(folder, out)
    tensors = load_file(folder / SINGLE_FILE)
    for i, scales in enumerate(per_layer):
        prefix = layer_prefix(i)
        mine = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        folded = apply_fp8_scales(
            mine, scales, cfg["num_attention_heads"], cfg["qk_nope_head_dim"], inverse
        )
        tensors.update({prefix + name: t.contiguous() for name, t in folded.items()})
    save_file(tensors, out / SINGLE_FILE, metadata={"format": "pt"})
    return out


def _ids() -> torch.Tensor:
    return torch.randint(0, 200, (2, 48), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def _logits(folder, kv_cache_dtype="auto") -> torch.Tensor:
    return load_model(folder, kv_cache_dtype)(_ids(), use_cache=False).logits


def _fp8_error(folder) -> float:
    want = _logits(folder)
    return float((_logits(folder, "fp8") - want).norm() / want.norm())


def test_any_power_of_two_fold_changes_no_logit(folders, tmp_path):
    plain, _ = folders
    cfg = json.loads((plain / CONFIG_FILE).read_text())
    g = torch.Generator().manual_seed(0)
    random = [
        Fp8Scales(
            torch.randint(-8, 9, (cfg["kv_lora_rank"],), generator=g).tolist(),
            torch.randint(-8, 9, (cfg["qk_rope_head_dim"] // 2,), generator=g).tolist(),
        )
        for _ in range(cfg["num_hidden_layers"])
    ]
    moved = _refold(plain, tmp_path / "moved", random, inverse=False)
    key = layer_prefix(0) + KV_B_PROJ
    assert not torch.equal(load_file(plain / SINGLE_FILE)[key], load_file(moved / SINGLE_FILE)[key])
    assert torch.equal(_logits(plain), _logits(moved))


def test_conversion_keeps_a_loud_source_in_range(folders, tmp_path):
    plain, loud = folders
    chosen = _chosen(loud)
    assert all(min(s.latent) < 0 for s in chosen), "the loud latent must be scaled down"
    for r in json.loads((loud / REPORT_FILE).read_text())["layers"]:
        assert r["fp8_scales"]["max_before"]["latent"] > E4M3_MAX  # it would saturate
        assert max(r["fp8_scales"]["max_after"].values()) <= E4M3_MAX / HEADROOM
    # the same checkpoint with the scales taken out: what vLLM would store without the stage
    unscaled = _refold(loud, tmp_path / "unscaled", chosen, inverse=True)
    assert torch.equal(_logits(unscaled), _logits(loud))
    ours, without, reference = _fp8_error(loud), _fp8_error(unscaled), _fp8_error(plain)
    assert without > 5 * ours, (without, ours)
    assert ours < 2 * reference, (ours, reference)  # as good as a source that was never loud


def test_stage_maxima_match_the_simulated_cache(folders):
    """The maxima the stage measures are those of the tensors the fp8 path caches."""
    plain, _ = folders
    model = load_model(plain)
    attn = model.model.layers[0].self_attn
    seen: list[torch.Tensor] = []
    hook = attn.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(_ids(), use_cache=False)
    hook.remove()
    maxima = cache_maxima(attn, seen)
    with torch.no_grad():
        x = seen[0].double()
        w = {n: p.double() for n, p in attn.named_parameters()}
        kv_a = x @ w["kv_a_proj_with_mqa.weight"].T
        if "kv_a_proj_with_mqa.bias" in w:
            kv_a = kv_a + w["kv_a_proj_with_mqa.bias"]
        q = x @ w["q_proj.weight"].T + w["q_proj.bias"]
        q = q.unflatten(-1, (attn.num_heads, -1))
        w_uk = w["kv_b_proj.weight"].view(attn.num_heads, -1, attn.rank)[:, : attn.nope_dim]
        absorbed = torch.einsum("bthn,hnr->bthr", q[..., : attn.nope_dim], w_uk)
    close = dict(rtol=1e-5, atol=1e-6)  # the model runs in fp32, the reference in fp64
    torch.testing.assert_close(maxima.latent, kv_a[..., : attn.rank].abs().amax((0, 1)), **close)
    torch.testing.assert_close(maxima.query, absorbed.abs().amax((0, 1, 2)), **close)
    rope_key = kv_a[..., attn.rank :].unflatten(-1, (-1, 2)).norm(dim=-1).amax((0, 1))
    torch.testing.assert_close(maxima.rope_key, rope_key, **close)


def test_choice_places_maxima_or_balances():
    from converter.math.fp8_scales import CacheMaxima

    m = CacheMaxima(
        latent=torch.tensor([3.0, 2000.0, 0.01, 0.0]),
        query=torch.tensor([5.0, 1.0, 50.0, 4.0]),
        rope_key=torch.tensor([0.1]),
        rope_query=torch.tensor([20.0]),
    )
    s = choose_fp8_scales(m)
    top = E4M3_MAX / HEADROOM
    # in range: untouched; too big: scaled down under the line; dead: untouched
    assert s.latent[0] == 0 and s.latent[3] == 0
    assert 2000 * 2.0 ** s.latent[1] <= top and 2.0 ** -s.latent[1] <= top
    # 0.01 vs 50: no power of two puts both in [1, 112], so the two are balanced
    assert s.latent[2] == round(0.5 * math.log2(50 / 0.01))
    assert 0.1 * 2.0 ** s.rope[0] >= 1 and 20 * 2.0 ** -s.rope[0] >= 1
