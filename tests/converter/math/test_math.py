"""The per-layer math against direct attention computations (no files, no transformers)."""

from __future__ import annotations

import pytest
import torch

from converter.math.assemble import GQAAttention, assemble_mla
from converter.math.kv_pca import balanced_kv_basis, max_rank
from converter.math.rorope import default_freqfold, key_rotation, valid_freqfolds


@pytest.fixture(autouse=True)
def float64_default():
    """These references compute in fp64; restore the default so other test modules see fp32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def neox_rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2) / d)
    ang = pos[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    rot = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def gptj_rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    r = x.shape[-1]
    inv = theta ** (-torch.arange(0, r, 2) / r)
    ang = pos[:, None] * inv[None]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack(
        [x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1
    ).flatten(-2)


def gqa_logits(src: GQAAttention, x: torch.Tensor, theta: float) -> torch.Tensor:
    """Attention logits [H, T, T] of the source layer (before the causal mask)."""
    t, d, h, g = x.shape[0], src.head_dim, src.num_heads, src.num_kv_heads
    pos = torch.arange(t, dtype=torch.float64)
    q = x @ src.q_weight.T + (0 if src.q_bias is None else src.q_bias)
    k = x @ src.k_weight.T + (0 if src.k_bias is None else src.k_bias)
    q = neox_rope(q.view(t, h, d).transpose(0, 1), pos, theta)
    k = neox_rope(k.view(t, g, d).transpose(0, 1), pos, theta)
    k = k.repeat_interleave(h // g, 0)
    return q @ k.transpose(-1, -2) * d**-0.5


def gqa_values(src: GQAAttention, x: torch.Tensor) -> torch.Tensor:
    t, d, h, g = x.shape[0], src.head_dim, src.num_heads, src.num_kv_heads
    v = x @ src.v_weight.T + (0 if src.v_bias is None else src.v_bias)
    return v.view(t, g, d).transpose(0, 1).repeat_interleave(h // g, 0)


def mla_logits_values(
    w: dict, x: torch.Tensor, heads: int, nope: int, rope: int, vdim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    t = x.shape[0]
    pos = torch.arange(t, dtype=torch.float64)
    q = x @ w["self_attn.q_proj.weight"].T + w.get("self_attn.q_proj.bias", 0)
    q = q.view(t, heads, nope + rope).transpose(0, 1)
    kv = x @ w["self_attn.kv_a_proj_with_mqa.weight"].T + w.get(
        "self_attn.kv_a_proj_with_mqa.bias", 0
    )
    rank = kv.shape[-1] - rope
    c, k_pe = kv[:, :rank], kv[:, rank:]
    kvb = (c @ w["self_attn.kv_b_proj.weight"].T).view(t, heads, nope + vdim).transpose(0, 1)
    k_nope, v = kvb[..., :nope], kvb[..., nope:]
    q_pe = gptj_rope(q[..., nope:], pos, theta)
    k_pe = gptj_rope(k_pe, pos, theta)
    logits = (q[..., :nope] @ k_nope.transpose(-1, -2) + q_pe @ k_pe.T) * (nope + rope) ** -0.5
    return logits, v


def random_layer(
    seed: int, hidden: int, heads: int, groups: int, d: int, bias: bool, shared_keys: bool
) -> GQAAttention:
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen) * 0.3

    wk = rnd(groups * d, hidden)
    bk = rnd(groups * d) if bias else None
    if shared_keys:  # every KV head's key is a multiple of head 0's: no energy outside rope
        scales = torch.linspace(1.0, -0.5, groups).repeat_interleave(d)[:, None]
        wk = wk[:d].repeat(groups, 1) * scales
        bk = None if bk is None else bk[:d].repeat(groups) * scales[:, 0]
    return GQAAttention(
        rnd(heads * d, hidden),
        wk,
        rnd(groups * d, hidden),
        rnd(hidden, heads * d),
        heads,
        groups,
        d,
        rnd(heads * d) if bias else None,
        bk,
        rnd(groups * d) if bias else None,
    )


def gram_of(src: GQAAttention, x: torch.Tensor) -> torch.Tensor:
    k = x @ src.k_weight.T + (0 if src.k_bias is None else src.k_bias)
    v = x @ src.v_weight.T + (0 if src.v_bias is None else src.v_bias)
    kv = torch.cat([k, v], -1)
    return kv.T @ kv


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("heads,groups,d", [(4, 2, 16), (6, 3, 8), (4, 4, 8)])
def test_exact_when_keys_shared_full_rope_full_rank(bias, heads, groups, d):
    src = random_layer(0, 32, heads, groups, d, bias, shared_keys=True)
    x = torch.randn(12, 32, generator=torch.Generator().manual_seed(1))
    gram = gram_of(src, x)
    width = groups * d
    rot = key_rotation(gram[:width, :width], groups, d, rope_dim=d, freqfold=1)
    assert rot.rope_energy_fraction == pytest.approx(1.0, abs=1e-12)
    latent = balanced_kv_basis(gram, rot.nope, rank=width)  # rho = V rank suffices
    assert latent.latent_energy_fraction == pytest.approx(1.0, abs=1e-9)
    w = assemble_mla(src, rot, latent)
    ref_logits, ref_v = gqa_logits(src, x, 1e4), gqa_values(src, x)
    logits, v = mla_logits_values(w, x, heads, d, d, d, 1e4)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(v, ref_v, rtol=1e-9, atol=1e-9)


def test_rotation_is_orthogonal_and_energy_matches_direct_projection():
    src = random_layer(3, 48, 8, 2, 16, True, shared_keys=False)
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(4))
    gram = gram_of(src, x)
    width = 32
    for fold in valid_freqfolds(16, 8):
        rot = key_rotation(gram[:width, :width], 2, 16, rope_dim=8, freqfold=fold)
        torch.testing.assert_close(rot.matrix @ rot.matrix.T, torch.eye(width))
        k = x @ src.k_weight.T + src.k_bias
        direct = float((k @ rot.rope.T).pow(2).sum() / k.pow(2).sum())
        assert rot.rope_energy_fraction == pytest.approx(direct, rel=1e-9)


def test_error_falls_as_rank_grows_and_vanishes_at_full_rank():
    src = random_layer(5, 48, 8, 2, 16, False, shared_keys=False)
    x = torch.randn(80, 48, generator=torch.Generator().manual_seed(6))
    gram = gram_of(src, x)
    rot = key_rotation(gram[:32, :32], 2, 16, rope_dim=16, freqfold=1)
    ref_v = gqa_values(src, x)
    errors = []
    for rank in (4, 16, 32, max_rank(32, 16)):
        latent = balanced_kv_basis(gram, rot.nope, rank)
        _, v = mla_logits_values(assemble_mla(src, rot, latent), x, 8, 16, 16, 16, 1e4)
        errors.append(float((v - ref_v).norm() / ref_v.norm()))
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.1
    assert errors[-1] < 1e-9


def test_degenerate_inputs_stay_finite():
    gram = torch.zeros(64, 64)
    rot = key_rotation(gram[:32, :32], 2, 16, rope_dim=8, freqfold=2)
    latent = balanced_kv_basis(gram, rot.nope, rank=8)
    assert torch.isfinite(rot.matrix).all() and torch.isfinite(latent.basis).all()
    assert latent.key_scale == 1.0


def test_freqfold_constraints():
    assert valid_freqfolds(128, 64) == [2, 4, 8, 16, 32, 64]
    assert valid_freqfolds(64, 64) == [1, 2, 4, 8, 16, 32]
    assert default_freqfold(128, 32) == 4
    with pytest.raises(ValueError, match="multiple of 2"):
        key_rotation(torch.eye(32), 2, 16, rope_dim=8, freqfold=1)


def test_ridge_refit_matches_direct_least_squares_and_its_residuals():
    """The in-place Cholesky refit against an augmented least-squares solve, and the residuals
    it reports (from the normal equations) against ||W A - Y||^2 computed directly."""
    from converter.math.refit import ridge_refit

    gen = torch.Generator().manual_seed(7)
    n_in, n_out, tokens, lam_rel = 24, 10, 200, 0.05
    a = torch.randn(tokens, n_in, generator=gen, dtype=torch.float64)
    y = a @ torch.randn(n_in, n_out, generator=gen, dtype=torch.float64)
    y += 0.3 * torch.randn(tokens, n_out, generator=gen, dtype=torch.float64)
    w0 = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64)
    g, c = a.T @ a, y.T @ a
    lam = lam_rel * float(torch.diagonal(g).mean())
    fit = ridge_refit(g.clone(), c.clone(), w0.float(), lam_rel, float(y.pow(2).sum()))
    # min ||A W^T - Y||^2 + lam ||W - W0||^2 as one stacked least-squares problem
    lhs = torch.cat([a, lam**0.5 * torch.eye(n_in, dtype=torch.float64)])
    rhs = torch.cat([y, lam**0.5 * w0.float().double().T])
    want = torch.linalg.lstsq(lhs, rhs).solution.T
    torch.testing.assert_close(fit.weight, want, rtol=1e-9, atol=1e-9)
    energy = float(y.pow(2).sum())
    for got, w in ((fit.rel_error_before, w0.float().double()), (fit.rel_error_after, want)):
        assert got == pytest.approx(float((a @ w.T - y).pow(2).sum()) / energy, rel=1e-8)
    assert fit.rel_error_after < fit.rel_error_before
