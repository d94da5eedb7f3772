"""vLLM's fp8 MLA KV cache simulated in transformers (eval / verify ``--kv-cache-dtype``).

vLLM keeps KV cache quantization out of its model files; so does our remote code, which has one
attention forward and knows nothing of fp8. ``simulate_fp8_cache`` replaces, on a loaded
converted model, every attention module's ``forward`` with ``fp8_cache_forward``: attention as
vLLM's MLA decode computes it over an fp8 cache (docs/fp8_cache.md). It uses only what the
remote code's attention module exposes (``project``, ``kv_b_proj``, ``o_proj``, its sizes) and
its module's rope and mask helpers, so it runs on any checkpoint's copy of that code.
Evaluation only: nothing is written to the checkpoint.
"""

from __future__ import annotations

import sys
from types import MethodType

import torch
from torch import nn

from converter.errors import ConversionError

# vLLM's --kv-cache-dtype names -> the fp8 format its cache stores ("fp8" means e4m3)
KV_CACHE_DTYPES = {
    "auto": None,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}

# what fp8_cache_forward reads: of the attention module, and of the module defining its class
_ATTENTION_NEEDS = ("project", "kv_b_proj", "o_proj", "num_heads", "rank", "rope_dim")
_ATTENTION_NEEDS += ("nope_dim", "v_dim", "scaling", "layer_idx")
_REMOTE_NEEDS = ("apply_interleaved_rope", "causal_mask")


def fp8_round_trip(x: torch.Tensor, fp8: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """``x`` written to an fp8 tensor and read back the way vLLM does it: x / scale in fp32,
    saturated to the largest finite value (CUDA's __NV_SATFINITE, vLLM's clamp before a cast;
    torch's bare cast would give NaN or inf), rounded to nearest even, then times scale in fp32
    and cast back to x's dtype. vLLM's default scale (no k_scale / q_scale in the checkpoint) is
    1.0."""
    big = torch.finfo(fp8).max
    stored = (x.float() / scale).clamp(-big, big).to(fp8)
    return (stored.float() * scale).to(x.dtype)


def fp8_cache_forward(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor | None,
    past_key_values,
    *,
    fp8: torch.dtype,
    fp8_query: bool,
) -> torch.Tensor:
    """The remote code's attention forward as vLLM's MLA decode computes it over an fp8 cache.

    vLLM stores the latent and the roped rope key of every token in ``fp8`` and its decode
    kernels read them back, the new token's own included; with ``fp8_query`` the absorbed
    query [q_nope W_UK ; q_pe] is quantized to e4m3 too (FLASHMLA / FLASHINFER_MLA; TRITON_MLA
    does not). Every position here is scored like a decoded token. (vLLM's prefill attends to
    the new tokens' own unquantized values.) A transformers cache holds the dequantized latent
    as keys and rope key as values, [B, 1, T, *].
    """
    remote = sys.modules[type(attn).__module__]
    q, kv_a = attn.project(hidden_states)
    q_nope, q_pe = q.transpose(1, 2).split([attn.nope_dim, attn.rope_dim], dim=-1)
    latent, k_pe = kv_a.split([attn.rank, attn.rope_dim], -1)
    bsz, _, seq, _ = q_nope.shape
    cos, sin = rope
    q_pe = remote.apply_interleaved_rope(q_pe, cos, sin)
    k_pe = fp8_round_trip(remote.apply_interleaved_rope(k_pe[:, None], cos, sin), fp8)
    latent = fp8_round_trip(latent[:, None], fp8)
    if past_key_values is not None:
        latent, k_pe = past_key_values.update(latent, k_pe, attn.layer_idx)
    w_kv = attn.kv_b_proj.weight.view(attn.num_heads, attn.nope_dim + attn.v_dim, attn.rank)
    w_uk, w_uv = w_kv.split([attn.nope_dim, attn.v_dim], dim=1)
    q = torch.cat((torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk), q_pe), dim=-1)
    if fp8_query:  # vLLM quantizes the query to e4m3 whatever the cache format
        q = fp8_round_trip(q, torch.float8_e4m3fn)
    keys = torch.cat((latent, k_pe), dim=-1)
    if mask is None:
        mask = remote.causal_mask(seq, 0, None, q.device)
    scores = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * attn.scaling + mask
    probs = scores.softmax(dim=-1).to(latent.dtype)
    out = torch.einsum("bhtr,hvr->bthv", torch.matmul(probs, latent), w_uv)
    return attn.o_proj(out.reshape(bsz, seq, -1))


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The converted model's attention modules, one per layer."""
    return [layer.self_attn for layer in model.model.layers]


def simulate_fp8_cache(model: nn.Module, kv_cache_dtype: str, fp8_query: bool = True) -> nn.Module:
    """Make a loaded converted model score as vLLM decodes over a ``kv_cache_dtype`` cache
    (``fp8_query``: the absorbed query is quantized to e4m3 too). "auto" leaves it as it is.
    Returns the model, changed in place."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ConversionError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}")
    fp8 = KV_CACHE_DTYPES[kv_cache_dtype]
    if fp8 is None:
        return model
    for attn in attention_modules(model):
        remote = sys.modules[type(attn).__module__]
        missing = [n for n in _ATTENTION_NEEDS if not hasattr(attn, n)]
        missing += [n for n in _REMOTE_NEEDS if not hasattr(remote, n)]
        if missing:
            raise ConversionError(
                f"--kv-cache-dtype {kv_cache_dtype}: {type(attn).__name__} ({remote.__name__}) "
                f"lacks {', '.join(missing)}; copy converter/remote_code/modeling_transmla.py "
                "over the folder's modeling_transmla.py"
            )

        def forward(self, hidden_states, rope, mask, past_key_values):
            return fp8_cache_forward(
                self, hidden_states, rope, mask, past_key_values, fp8=fp8, fp8_query=fp8_query
            )

        attn.forward = MethodType(forward, attn)  # an instance attribute: nn.Module calls it
    return model
