"""The plugin's CPU MLA prefill (torch's fused flash attention) against vLLM's own CPU prefill
backend, called directly on ragged batches; its switch and its registration. The engine-level
parity with it on and off is in test_vllm_parity.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm.v1.attention.backends.mla.prefill.cpu_sdpa import (  # noqa: E402
    CPUSDPAMLAPrefillBackend,
)
from vllm.v1.attention.backends.mla.prefill.registry import MLAPrefillBackendEnum  # noqa: E402
from vllm.v1.attention.backends.mla.prefill.selector import (  # noqa: E402
    _auto_select_mla_prefill_backend,
    get_mla_prefill_backend,
)

from transmla_vllm import cpu_prefill  # noqa: E402
from transmla_vllm.cpu_prefill import (  # noqa: E402
    CALLS,
    CPU_PREFILL_ENV,
    CPUFlashMLAPrefillBackend,
    register_cpu_prefill,
)

HEADS = 4
# (qk_nope, qk_rope, v): the served Llama-3-8B-shape conversion (128 + 64, v 128; v is padded
# up to the query's 192 for the kernel), and a v wider than q / k (q and k padded instead)
DIMS = {"nope128-rope64-v128": (128, 64, 128), "nope16-rope16-v64": (16, 16, 64)}
# Ragged batches with one-token and empty requests; new tokens use the same lengths for q and k
NEW_LENS = [5, 1, 0, 37, 3]
CONTEXT = {"q": [4, 0, 9, 1, 6], "kv": [0, 7, 30, 5, 64]}  # no keys / no queries / both
# bf16 and fp16 (why these bounds): vLLM's backend upcasts to fp32 and rounds the output once;
# the fused kernel accumulates in fp32 but keeps the probabilities in the input dtype for the
# product with v (one rounding each, relative 2^-9 in bf16, 2^-12 in fp16), so its output may
# differ by about 2 roundings of max|v| (the probabilities sum to 1): the bound is 4 of them.
# The log-sum-exp is fp32 on both sides, from the same low-precision inputs (the kernel's
# blocked sums and its vectorised exp: measured under 6e-5). A log-sum-exp off by e scales a
# merged partial output by exp(e) ~ 1 + e: 1e-4 is below one fp16 rounding (2^-12) of it.
ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2.0**-9, torch.float16: 2.0**-12}
FP32_ATOL = 1e-5


def backends(nope: int, rope: int, v: int) -> tuple[CPUSDPAMLAPrefillBackend, ...]:
    kw = dict(
        num_heads=HEADS,
        scale=(nope + rope) ** -0.5,
        kv_lora_rank=512,
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope,
        v_head_dim=v,
        vllm_config=None,
    )
    return CPUSDPAMLAPrefillBackend(**kw), CPUFlashMLAPrefillBackend(**kw)


def cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def qkv(q_len: int, kv_len: int, dims: tuple[int, int, int], dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    nope, rope, v = dims

    def rand(n, d):
        return torch.randn(n, HEADS, d, generator=g).to(dtype)

    # k as vLLM builds it (k_nope and the shared rope key concatenated), v a strided view
    k_nope_v = rand(kv_len, nope + v)
    k_pe = rand(kv_len, rope)[:, :1].expand(kv_len, HEADS, rope)
    k = torch.cat([k_nope_v[..., :nope], k_pe], dim=-1)
    return rand(q_len, nope + rope), k, k_nope_v[..., nope:]


def tolerance(dtype, v: torch.Tensor) -> tuple[float, float]:
    """(output, log-sum-exp) absolute tolerances; see ROUNDING."""
    if dtype == torch.float32:
        return FP32_ATOL, FP32_ATOL
    return 4 * ROUNDING[dtype] * v.float().abs().max().item(), 1e-4


def compare(want, got, dtype, v, label: str) -> None:
    want = want if isinstance(want, tuple) else (want,)
    got = got if isinstance(got, tuple) else (got,)
    assert len(want) == len(got)
    out_tol, lse_tol = tolerance(dtype, v)
    assert got[0].dtype == want[0].dtype and got[0].shape == want[0].shape
    out_err = (got[0].float() - want[0].float()).abs().max().item() if want[0].numel() else 0.0
    msg = f"{label}: max |out diff| {out_err:.2e} (tolerance {out_tol:.1e})"
    assert out_err <= out_tol, msg
    if len(want) == 2:
        w, g = want[1], got[1]
        assert g.dtype == torch.float32 and g.shape == w.shape
        assert torch.equal(torch.isinf(w), torch.isinf(g))  # -inf: a request with no keys
        finite = torch.isfinite(w)
        lse_err = (g[finite] - w[finite]).abs().max().item() if finite.any().item() else 0.0
        msg += f", max |lse diff| {lse_err:.2e} (tolerance {lse_tol:.0e})"
        assert lse_err <= lse_tol, msg
    print(msg)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("dims", DIMS.values(), ids=DIMS.keys())
@pytest.mark.parametrize("lse", [False, True], ids=["out", "out+lse"])
def test_new_tokens_match_vllm_backend(dtype, dims, lse):
    ref, ours = backends(*dims)
    metadata = SimpleNamespace(query_start_loc=cu(NEW_LENS))
    ref.prepare_metadata(metadata)
    ours.prepare_metadata(metadata)
    q, k, v = qkv(sum(NEW_LENS), sum(NEW_LENS), dims, dtype)
    before = CALLS["fused"]
    got = ours.run_prefill_new_tokens(q, k, v, return_softmax_lse=lse)
    assert CALLS["fused"] == before + 1
    compare(ref.run_prefill_new_tokens(q, k, v, lse), got, dtype, v, f"new tokens {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("dims", DIMS.values(), ids=DIMS.keys())
def test_context_chunk_matches_vllm_backend(dtype, dims):
    ref, ours = backends(*dims)
    chunk = SimpleNamespace(query_start_loc=cu(CONTEXT["q"]), cu_seq_lens=cu(CONTEXT["kv"]))
    q, k, v = qkv(sum(CONTEXT["q"]), sum(CONTEXT["kv"]), dims, dtype, seed=1)
    want = ref.run_prefill_context_chunk(chunk, q, k, v)
    got = ours.run_prefill_context_chunk(chunk, q, k, v)
    compare(want, got, dtype, v, f"context chunk {dtype}")
    assert (got[0][:4] == 0).all() and torch.isneginf(got[1][:, :4]).all()  # no keys


@pytest.mark.parametrize("q_lens,kv_lens", [([3, 9], [7, 2]), ([0, 0], [0, 0])])
def test_causal_with_unequal_lengths_follows_vllm(q_lens, kv_lens):
    """vLLM's mask is aligned top-left (row i sees keys 0..i), also when the lengths differ; the
    batch with only empty requests returns empty tensors (the kernel is never called)."""
    dims = DIMS["nope128-rope64-v128"]
    ref, ours = backends(*dims)
    q, k, v = qkv(sum(q_lens), sum(kv_lens), dims, torch.float32, seed=2)
    args = (q, k, v, cu(q_lens), cu(kv_lens), True, True)
    compare(ref._ragged_sdpa(*args), ours._attend(*args, None), torch.float32, v, "causal")


def test_out_is_written_in_place():
    dims = DIMS["nope128-rope64-v128"]
    ref, ours = backends(*dims)
    metadata = SimpleNamespace(query_start_loc=cu(NEW_LENS))
    ref.prepare_metadata(metadata)
    ours.prepare_metadata(metadata)
    q, k, v = qkv(sum(NEW_LENS), sum(NEW_LENS), dims, torch.float32)
    out = torch.full((q.shape[0], HEADS, dims[2]), float("nan"))
    assert ours.supports_out()
    assert ours.run_prefill_new_tokens(q, k, v, False, out=out) is out
    compare(ref.run_prefill_new_tokens(q, k, v, False), out, torch.float32, v, "in place")


def test_unserved_dtype_goes_to_vllm_backend():
    dims = DIMS["nope16-rope16-v64"]
    ref, ours = backends(*dims)
    metadata = SimpleNamespace(query_start_loc=cu(NEW_LENS))
    ref.prepare_metadata(metadata)
    ours.prepare_metadata(metadata)
    q, k, v = qkv(sum(NEW_LENS), sum(NEW_LENS), dims, torch.float64)
    fused, fallback = CALLS["fused"], CALLS["fallback"]
    got = ours.run_prefill_new_tokens(q, k, v, True)
    assert (CALLS["fused"], CALLS["fallback"]) == (fused, fallback + 1)
    want = ref.run_prefill_new_tokens(q, k, v, True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ------------------------------------------------------------------------------------------
# Switch and registration
# ------------------------------------------------------------------------------------------
@pytest.fixture
def cpu_slot():
    """vLLM's CPU prefill slot and selection cache, restored after the test."""
    slot = MLAPrefillBackendEnum.CPU
    saved = slot.get_path() if slot.is_overridden() else None
    yield slot
    slot.clear_override()
    if saved is not None:
        from vllm.v1.attention.backends.mla.prefill.registry import register_mla_prefill_backend

        register_mla_prefill_backend(slot, saved)
    _auto_select_mla_prefill_backend.cache_clear()


def test_plugin_registers_the_backend_on_cpu(cpu_slot, monkeypatch):
    import transmla_vllm

    monkeypatch.delenv(CPU_PREFILL_ENV, raising=False)
    cpu_slot.clear_override()
    transmla_vllm.register()
    transmla_vllm.register()  # idempotent
    assert cpu_slot.get_path() == cpu_prefill.CLASS_PATH
    assert get_mla_prefill_backend(None) is CPUFlashMLAPrefillBackend


@pytest.mark.parametrize("off", ["0", "false", "OFF", "no"])
def test_switch_keeps_vllm_backend(cpu_slot, monkeypatch, off):
    monkeypatch.delenv(CPU_PREFILL_ENV, raising=False)
    assert register_cpu_prefill() is True
    assert get_mla_prefill_backend(None) is CPUFlashMLAPrefillBackend  # selection cached
    monkeypatch.setenv(CPU_PREFILL_ENV, off)
    assert register_cpu_prefill() is False  # undoes the earlier registration and the cache
    assert not cpu_slot.is_overridden()
    assert get_mla_prefill_backend(None) is CPUSDPAMLAPrefillBackend


def test_nothing_registered_off_cpu(cpu_slot, monkeypatch):
    from vllm.platforms import current_platform

    import transmla_vllm

    monkeypatch.delenv(CPU_PREFILL_ENV, raising=False)
    cpu_slot.clear_override()
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    transmla_vllm.register()
    assert register_cpu_prefill() is False
    assert not cpu_slot.is_overridden()
