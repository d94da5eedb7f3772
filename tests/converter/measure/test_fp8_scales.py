"""fp8-friendly scales (issue 14, item 3): exact in fp32, and they rescue a saturating cache.

Any power-of-two fold leaves fp32 logits bit for bit. A source made loud (v_proj x 512,
o_proj / 512: the same function) converts to a latent far past e4m3's 448; the conversion's
scales must bring the fp8 simulation's error back to that of the quiet source, and the same
checkpoint with the scales taken out (what vLLM would store without the stage) must lose far
more. Errors are measured against the model's own unquantized logits.

Exactness in the output dtype D (``fit_to_dtype``): for every weight w, cast_D(fold(w)) must
equal fold(cast_D(w)) taken in float64, bit for bit: the D checkpoint is then the unscaled D
checkpoint with its weights moved by powers of two. fp16's narrow range forces clamps; bf16 and
fp32 keep ordinary exponents.
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
    MAX_EXPONENT,
    Fp8Scales,
    apply_fp8_scales,
    choose_fp8_scales,
    fit_to_dtype,
)
from converter.measure.perplexity import load_model
from transmla_testing.models import edit_tensors, make_model
from transmla_vllm.checkpoint_format import (
    CONFIG_FILE,
    KV_A_BIAS,
    KV_A_KEY_MAP,
    KV_A_PROJ,
    KV_B_PROJ,
    O_PROJ,
    Q_BIAS,
    Q_HEAD_MAP,
    Q_PROJ,
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


# --- exactness in the output dtype (fit_to_dtype) ----------------------------------------------

HEADS, NOPE, ROPE, RANK, WIDTH = 3, 8, 8, 10, 40


def _layer(make) -> dict[str, torch.Tensor]:
    """One layer's attention tensors in fp32 (plain and normed names together: the fold treats
    each the same way), entries from ``make(rows, cols)``."""
    kv_a, q = RANK + ROPE, HEADS * (NOPE + ROPE)
    return {
        KV_A_PROJ: make(kv_a, WIDTH),
        KV_A_KEY_MAP: make(kv_a, WIDTH),
        KV_A_BIAS: make(kv_a, 1)[:, 0],
        KV_B_PROJ: make(HEADS * 2 * NOPE, RANK),
        Q_PROJ: make(q, WIDTH),
        Q_HEAD_MAP: make(q, NOPE),
        Q_BIAS: make(q, 1)[:, 0],
        O_PROJ: make(WIDTH, HEADS * NOPE),
    }


def _banded(g: torch.Generator, centers: tuple[int, int]):
    """Entries +-2^(c + U(-3, 3)), c drawn per row from ``centers``, 5 % zeros: rows whose
    magnitudes sit far apart, some near the limits of fp16 (or of fp32 / bf16)."""

    def make(rows: int, cols: int) -> torch.Tensor:
        c = torch.randint(centers[0], centers[1] + 1, (rows, 1), generator=g).double()
        t = torch.exp2(
            c + torch.empty(rows, cols, dtype=torch.float64).uniform_(-3, 3, generator=g)
        )
        t = t * (torch.randint(0, 2, (rows, cols), generator=g) * 2 - 1)
        t[torch.rand(rows, cols, generator=g) < 0.05] = 0
        return t.float()

    return make


def _requested(g: torch.Generator, top: int = MAX_EXPONENT) -> Fp8Scales:
    def exps(n: int) -> list[int]:
        return torch.randint(-top, top + 1, (n,), generator=g).tolist()

    return Fp8Scales(exps(RANK), exps(ROPE // 2))


def _fold_is_exact(tensors: dict[str, torch.Tensor], scales: Fp8Scales, dtype) -> bool:
    """cast(fold(w)) == fold(cast(w)) for every entry: the fold as the stage does it (in fp32)
    then cast, against the cast weights folded in float64 (exact there)."""
    folded = apply_fp8_scales(tensors, scales, HEADS, NOPE)
    cast_first = apply_fp8_scales(
        {n: t.to(dtype).double() for n, t in tensors.items()}, scales, HEADS, NOPE
    )
    return all(torch.equal(folded[n].to(dtype).double(), cast_first[n]) for n in tensors)


def _toward_zero(fitted: Fp8Scales, requested: Fp8Scales) -> bool:
    pairs = zip(fitted.latent + fitted.rope, requested.latent + requested.rope, strict=True)
    return all(f * r >= 0 and abs(f) <= abs(r) for f, r in pairs)


@pytest.mark.parametrize(
    ("dtype", "centers"),
    [(torch.float16, (-12, 12)), (torch.bfloat16, (-30, 30)), (torch.bfloat16, (-124, 124))],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fitted_fold_is_exact_in_the_output_dtype(dtype, centers, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = _layer(_banded(g, centers))
    requested = _requested(g)
    fitted = fit_to_dtype(requested, tensors, HEADS, NOPE, dtype)
    assert _fold_is_exact(tensors, fitted, dtype)
    assert _toward_zero(fitted, requested)
    assert not fitted.identity  # it clamps, it does not give up
    if centers[1] < 100:  # rows far inside fp32: the ordinary range
        assert (fitted == requested) == (dtype == torch.bfloat16)
    if fitted != requested:  # the clamp was needed: the requested fold is not exact
        assert not _fold_is_exact(tensors, requested, dtype)
    if dtype == torch.bfloat16 and centers[1] > 100:
        assert fitted != requested  # rows near 2^+-124: 2^24 leaves bf16's (and fp32's) range


def test_clamp_stops_at_the_range_edges():
    """Entries in [1, 1.5]: fp16 holds x 2^15 (1.5 x 2^15 = 49152 <= 65504, 2^16 overflows)
    and / 2^14 (2^-14 is its smallest normal): each exponent stops at the tighter side."""
    g = torch.Generator().manual_seed(0)
    tensors = _layer(lambda r, c: 1 + 0.5 * torch.rand(r, c, generator=g))
    for t in tensors.values():
        t.view(-1)[0] = 1.5 if t.dim() > 1 else 1.0
    requested = Fp8Scales([24, -24] * (RANK // 2), [24, -24] * (ROPE // 4))
    fp16 = fit_to_dtype(requested, tensors, HEADS, NOPE, torch.float16)
    assert fp16 == Fp8Scales([14, -14] * (RANK // 2), [14, -14] * (ROPE // 4))
    assert _fold_is_exact(tensors, fp16, torch.float16)
    one_more = Fp8Scales([15, -15] * (RANK // 2), [15, -15] * (ROPE // 4))
    assert not _fold_is_exact(tensors, one_more, torch.float16)  # x / 2^15 is subnormal
    # one fp16-subnormal entry in kv_b's column 0 that fp16 cannot hold exactly: no scaling
    # up (its rounding grid would get finer), and scaling down would lose its bits: exponent 0
    tensors[KV_B_PROJ][0, 0] = 1e-6
    assert fit_to_dtype(requested, tensors, HEADS, NOPE, torch.float16).latent[0] == 0
    # the same column with an exactly representable subnormal (2^-20) may be scaled up
    tensors[KV_B_PROJ][0, 1] = 2.0**-20
    fitted = fit_to_dtype(requested, tensors, HEADS, NOPE, torch.float16)
    assert fitted.latent[1] == -14
    assert _fold_is_exact(tensors, fitted, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clamp_keeps_ordinary_scales_in_wide_dtypes(dtype):
    """Weights as a model has them (N(0, 0.02^2), some exact zeros): any exponent up to the
    bound is exact in fp32 and bf16, so nothing is clamped (fp16 clamps the same request)."""
    g = torch.Generator().manual_seed(5)

    def ordinary(rows: int, cols: int) -> torch.Tensor:
        t = torch.randn(rows, cols, generator=g) * 0.02
        t[torch.rand(rows, cols, generator=g) < 0.05] = 0
        return t

    tensors = _layer(ordinary)
    for top in (1, 8, MAX_EXPONENT):
        requested = _requested(g, top)
        assert fit_to_dtype(requested, tensors, HEADS, NOPE, dtype) == requested
        assert _fold_is_exact(tensors, requested, dtype)
    assert fit_to_dtype(requested, tensors, HEADS, NOPE, torch.float16) != requested


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_conversion_in_a_narrow_dtype_is_exact(folders, tmp_path, calib_file, dtype):
    """The loud source converted with --dtype D against the fp32 conversion with its scales taken
    out (w): every stored tensor equals cast_D(w) folded with the D conversion's scales, in
    float64. fp16 must clamp (the fp32 conversion's scales are not exact there); bf16 keeps them."""
    _, loud = folders
    out = tmp_path / dtype
    convert(
        ConvertOptions(
            src=str(loud.parent / "loud-src"),
            dst=str(out),
            rope_dim=16,
            kv_lora_rank=48,
            calib_text=str(calib_file),
            calib_samples=8,
            calib_seqlen=64,
            dtype=dtype,
        )
    )
    cast = getattr(torch, dtype)
    cfg = json.loads((loud / CONFIG_FILE).read_text())
    heads, nope = cfg["num_attention_heads"], cfg["qk_nope_head_dim"]
    fp32, narrow = load_file(loud / SINGLE_FILE), load_file(out / SINGLE_FILE)
    reports = json.loads((out / REPORT_FILE).read_text())["layers"]
    for i, (wide_scales, scales, report) in enumerate(
        zip(_chosen(loud), _chosen(out), reports, strict=True)
    ):
        prefix = layer_prefix(i)
        stored = {k[len(prefix) :]: v for k, v in fp32.items() if k.startswith(prefix)}
        w = apply_fp8_scales(stored, wide_scales, heads, nope, inverse=True)
        cast_w = {n: t.to(cast).double() for n, t in w.items()}
        want = apply_fp8_scales(cast_w, scales, heads, nope)
        for name, t in want.items():
            assert narrow[prefix + name].dtype == cast
            assert torch.equal(narrow[prefix + name].double(), t), (i, name)
        assert not wide_scales.identity
        record = report["fp8_scales"]
        if dtype == "bfloat16":
            assert scales == wide_scales and "clamped_for" not in record
            continue
        assert record["clamped_for"] == "float16" and record["clamped"] > 0
        requested = Fp8Scales(record["requested_latent_log2"], record["requested_rope_pair_log2"])
        assert requested == wide_scales  # the choice itself does not depend on the dtype
        unclamped = apply_fp8_scales(cast_w, wide_scales, heads, nope)
        folded = apply_fp8_scales(w, wide_scales, heads, nope)
        assert not all(torch.equal(folded[n].to(cast).double(), unclamped[n]) for n in w)
