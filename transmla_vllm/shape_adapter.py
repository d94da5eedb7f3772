"""Config validation and load-time shape adaptation for TransMLA checkpoints.

A converted checkpoint may have any latent size ``kv_lora_rank`` (rho) and rope
size ``qk_rope_head_dim`` (r), but vLLM's MLA kernels only accept a few shapes:

* every MLA backend: ``rho + r`` in {320, 512, 576} (``MLACommonMetadata``);
* CPU_MLA, AMX_MLA, FlashMLA, FlashAttention-MLA, CUTLASS, FlashInfer, AITER:
  the DeepSeek split ``rho = 512, r = 64`` only (the kernels are compiled for it);
* prefill on Hopper/Blackwell (FLASH_ATTN): (nope, rope, v) from a fixed list.

Zero padding serves any smaller shape exactly:

* latent: extra zero rows at the end of the latent block of
  ``kv_a_proj_with_mqa`` (weight and bias) and extra zero columns of
  ``kv_b_proj`` -- the extra latent channels are always 0 and read by nothing;
* rope r -> r' = k*r (k integer): rope pair m moves to pair slot k*m and the
  other slots are zero.  An r'-dim RoPE gives slot k*m the frequency
  theta^(-2km/r') = theta^(-2m/r), the frequency pair m had; the default,
  linear and llama3 laws only depend on that frequency, so scores are unchanged;
* nope / v: zero q/k nope rows, zero v rows of ``kv_b_proj`` and zero input
  columns of ``o_proj``.

The softmax scale stays (source nope + source rope)^-0.5.

The decision is taken once, in the process that builds the ``VllmConfig``
(``TransMLAConfigHook.verify_and_update_config``, run by
``VllmConfig.try_verify_and_update_config``), and written into the HF config
(``kv_lora_rank`` and friends) plus ``model_arch_config.head_size``, so that the
KV-cache spec, ``get_head_size()``, the attention backend selector and the MLA
prefill selector all see one consistent served shape in every process (the
config is pickled to the engine core and the workers).  The model class calls
the same idempotent ``ensure_served_shape`` in case the hook did not run.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from transmla_vllm.checkpoint_format import (
    ARCHITECTURE,
    FORMAT_VERSION,
    SUPPORTED_ROPE_TYPES,
    LatentDims,
)

if TYPE_CHECKING:
    from vllm.config import ModelConfig, VllmConfig

__all__ = ["ARCHITECTURE", "MLA_HEAD_SIZES", "ServePlan", "ensure_served_shape"]

# kv_lora_rank + qk_rope_head_dim sizes accepted by every vLLM MLA backend.
MLA_HEAD_SIZES: tuple[int, ...] = (320, 512, 576)
MAX_MLA_HEAD_SIZE = max(MLA_HEAD_SIZES)
# The split the DeepSeek-shaped kernels are compiled for.
DEEPSEEK_KV_LORA_RANK = 512
DEEPSEEK_ROPE_DIM = 64
# Decode backends whose kernels take any latent/rope split of a valid head size.
FLEXIBLE_SPLIT_BACKENDS = frozenset({"TRITON_MLA"})
# (nope, rope, v) shapes accepted by vLLM's fixed-shape MLA prefill kernels.
PREFILL_SHAPES: tuple[tuple[int, int, int], ...] = (
    (64, 64, 128),
    (128, 64, 128),
    (192, 64, 256),
    (256, 0, 256),
)

# Env var: force the served v head dim (tests the v-padding path on CPU).
FORCE_PAD_V_ENV = "TRANSMLA_FORCE_PAD_V"
# Attribute on the HF config holding the applied ServePlan (plain dict).
PLAN_ATTR = "transmla_served_shape"

_REQUIRED_DIMS = ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")


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
    def rope_stride(self) -> int:
        """Pair slot stride k: source rope pair m sits in served slot k*m."""
        return self.served.qk_rope_head_dim // self.source.qk_rope_head_dim

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


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------
def transmla_block(hf_config: Any) -> dict[str, Any]:
    """The checkpoint's ``transmla`` provenance block (empty if absent)."""
    block = getattr(hf_config, "transmla", None)
    return dict(block) if isinstance(block, dict) else {}


def _raw_config(model_config: ModelConfig | None) -> dict[str, Any] | None:
    """config.json as written, to tell missing fields from transformers defaults."""
    if model_config is None:
        return None
    path = os.path.join(str(model_config.model), "config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def validate_config(hf_config: Any, raw: dict[str, Any] | None = None) -> LatentDims:
    """Refuse configs this architecture cannot serve; return the source dims.

    ``raw`` is the unparsed config.json when available: transformers'
    DeepseekV3Config silently fills missing MLA dims with DeepSeek defaults.
    """
    for name in _REQUIRED_DIMS:
        value = getattr(hf_config, name, None)
        if raw is not None and name not in raw:
            value = None
        if not isinstance(value, int) or value <= 0:
            raise ValueError(
                f"TransMLA config field '{name}' is missing or not a positive "
                f"integer (found {value!r}); the converter must write it."
            )
    if getattr(hf_config, "q_lora_rank", None) is not None:
        raise ValueError(
            "TransMLA config field 'q_lora_rank' must be null: this plugin serves "
            f"a full-rank q_proj only (found {hf_config.q_lora_rank!r})."
        )
    n_experts = getattr(hf_config, "n_routed_experts", 0) or 0
    if n_experts > 0:
        raise ValueError(
            f"TransMLA config field 'n_routed_experts' is {n_experts}: MoE MLPs are "
            "not supported, it must be 0."
        )
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"TransMLA config field 'hidden_act' must be 'silu', not {act!r}.")
    block = transmla_block(hf_config)
    version = block.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ValueError(
            f"TransMLA config field 'transmla.format_version' is {version!r}; this "
            f"plugin reads version {FORMAT_VERSION}. Use a matching transmla_vllm."
        )
    if block.get("latent_norm", False):
        raise ValueError(
            "TransMLA config field 'transmla.latent_norm' is true, but this format "
            "has no latent RMSNorm (kv_a_layernorm); reconvert the checkpoint."
        )
    layout = block.get("rope_layout", "interleaved")
    if layout != "interleaved" or not getattr(hf_config, "rope_interleave", True):
        raise ValueError(
            "TransMLA config field 'transmla.rope_layout' must be 'interleaved' and "
            f"'rope_interleave' true (found {layout!r}, "
            f"{getattr(hf_config, 'rope_interleave', None)!r})."
        )
    rope = hf_config.qk_rope_head_dim
    if rope % 2:
        raise ValueError(f"TransMLA config field 'qk_rope_head_dim' must be even (found {rope}).")
    heads = getattr(hf_config, "num_attention_heads", None)
    if not isinstance(heads, int) or heads <= 0:
        raise ValueError(f"TransMLA config field 'num_attention_heads' is invalid ({heads!r}).")
    rope_parameters_for(hf_config)  # raises on an unsupported rope_type
    return LatentDims(
        kv_lora_rank=hf_config.kv_lora_rank,
        qk_rope_head_dim=rope,
        qk_nope_head_dim=hf_config.qk_nope_head_dim,
        v_head_dim=hf_config.v_head_dim,
    )


def rope_parameters_for(hf_config: Any) -> dict[str, Any]:
    """Clean rope_parameters for vLLM's get_rope: the source's own scaling law.

    Only the keys of the supported laws are passed on, so that neither a stray
    ``partial_rotary_factor`` nor DeepSeek-YaRN keys change the rope.
    """
    params = getattr(hf_config, "rope_parameters", None) or {}
    if not params and getattr(hf_config, "rope_scaling", None):
        params = dict(hf_config.rope_scaling)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"TransMLA config field 'rope_parameters.rope_type' is {rope_type!r}; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)} (laws that depend on "
            "the frequency only, so an r-dim rope keeps the source's positions)."
        )
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise ValueError("TransMLA config field 'rope_parameters.rope_theta' is missing.")
    clean: dict[str, Any] = {"rope_type": rope_type, "rope_theta": float(theta)}
    keys: tuple[str, ...] = ()
    if rope_type == "linear":
        keys = ("factor",)
    elif rope_type == "llama3":
        keys = (
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        )
    for key in keys:
        if key not in params:
            raise ValueError(
                f"TransMLA config field 'rope_parameters.{key}' is required for "
                f"rope_type {rope_type!r}."
            )
        clean[key] = params[key]
    return clean


# --------------------------------------------------------------------------
# Planning: which shape to serve
# --------------------------------------------------------------------------
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


def _probe_decode(vllm_config: VllmConfig, shape: LatentDims) -> str | None:
    """Name of the MLA decode backend vLLM would pick for ``shape`` (None: none)."""
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
    if not backend.supports_head_size(head_size):
        return None
    return backend.get_name()


def _probe_prefill(vllm_config: VllmConfig, shape: LatentDims) -> str | None:
    """Name of the MLA prefill backend vLLM would pick for ``shape`` (None: none)."""
    from vllm.v1.attention.backends.mla.prefill.selector import get_mla_prefill_backend

    try:
        with _dims_on_config(vllm_config.model_config.hf_text_config, shape):
            return get_mla_prefill_backend(vllm_config).get_name()
    except (ValueError, NotImplementedError, ImportError):
        return None


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
        for n, r, v in PREFILL_SHAPES
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
            f"{MAX_MLA_HEAD_SIZE}: no vLLM MLA backend can serve it. Set "
            "VLLM_MLA_DISABLE=1 (ordinary attention, full per-head KV cache) or "
            "reconvert with kv_lora_rank + qk_rope_head_dim <= 576."
        )
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
                tried.append(f"decode head {head_size} ({rank}+{rope}): {decode} needs 512+64")
                continue
            return ServePlan(src, shape, True, decode, prefill)
    raise ValueError(
        f"TransMLA checkpoint shape {src} cannot be padded to a shape the selected "
        f"vLLM MLA backends accept ({'; '.join(tried)}). Set VLLM_MLA_DISABLE=1, "
        "choose --attention-backend TRITON_MLA, or reconvert with qk_rope_head_dim "
        "dividing 64 and kv_lora_rank <= 512."
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


def served_plan(hf_config: Any) -> ServePlan | None:
    """The plan already applied to this config, if any."""
    data = getattr(hf_config, PLAN_ATTR, None)
    return ServePlan.from_dict(data) if isinstance(data, dict) else None


def ensure_served_shape(vllm_config: VllmConfig) -> ServePlan:
    """Validate, plan and apply the served shape once (idempotent).

    Writes the served dims into the HF config and fixes
    ``model_arch_config.head_size`` (read by ``ModelConfig.get_head_size()``,
    which the MLA metadata builder checks against the supported sizes).
    """
    model_config = vllm_config.model_config
    hf_config = model_config.hf_text_config
    plan = served_plan(hf_config)
    if plan is not None:
        return plan
    src = validate_config(hf_config, _raw_config(model_config))
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
            validate_config(model_config.hf_text_config, _raw_config(model_config))

    @staticmethod
    def verify_and_update_config(vllm_config: VllmConfig) -> None:
        ensure_served_shape(vllm_config)


# --------------------------------------------------------------------------
# Tensor padding (checkpoint shape -> served shape), all exact
# --------------------------------------------------------------------------
def _pad_rope_rows(rope: torch.Tensor, stride: int) -> torch.Tensor:
    """Move interleaved rope pair m (rows 2m, 2m+1) to pair slot stride*m."""
    if stride == 1:
        return rope
    pairs = rope.reshape(rope.shape[0] // 2, 2, *rope.shape[1:])
    out = pairs.new_zeros(pairs.shape[0] * stride, *pairs.shape[1:])
    out[::stride] = pairs
    return out.reshape(-1, *rope.shape[1:])


def _place(block: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero-extend the leading dim of ``block`` to ``rows``."""
    if block.shape[0] == rows:
        return block
    out = block.new_zeros(rows, *block.shape[1:])
    out[: block.shape[0]] = block
    return out


def pad_q_proj(t: torch.Tensor, plan: ServePlan, num_heads: int) -> torch.Tensor:
    """q_proj weight [H*(dn+r), D] or bias [H*(dn+r)] -> served per-head layout."""
    src, dst = plan.source, plan.served
    per_head = t.reshape(num_heads, src.qk_nope_head_dim + src.qk_rope_head_dim, -1)
    out = []
    for head in per_head:
        nope, rope = head.split([src.qk_nope_head_dim, src.qk_rope_head_dim])
        out.append(
            torch.cat(
                [
                    _place(nope, dst.qk_nope_head_dim),
                    _pad_rope_rows(rope, plan.rope_stride),
                ]
            )
        )
    return torch.stack(out).reshape(-1, *t.shape[1:])


def pad_kv_a_proj(t: torch.Tensor, plan: ServePlan) -> torch.Tensor:
    """kv_a_proj_with_mqa weight [rho+r, D] or bias: zero latent rows, rope last."""
    src, dst = plan.source, plan.served
    latent, rope = t.split([src.kv_lora_rank, src.qk_rope_head_dim])
    return torch.cat([_place(latent, dst.kv_lora_rank), _pad_rope_rows(rope, plan.rope_stride)])


def pad_kv_b_proj(t: torch.Tensor, plan: ServePlan, num_heads: int) -> torch.Tensor:
    """kv_b_proj weight [H*(dn+dv), rho] -> [H*(dn'+dv'), rho'] with zeros."""
    src, dst = plan.source, plan.served
    per_head = t.reshape(num_heads, src.qk_nope_head_dim + src.v_head_dim, -1)
    out = t.new_zeros(num_heads, dst.qk_nope_head_dim + dst.v_head_dim, dst.kv_lora_rank)
    dn, dv, rho = src.qk_nope_head_dim, src.v_head_dim, src.kv_lora_rank
    out[:, :dn, :rho] = per_head[:, :dn]
    out[:, dst.qk_nope_head_dim : dst.qk_nope_head_dim + dv, :rho] = per_head[:, dn:]
    return out.reshape(-1, dst.kv_lora_rank)


def pad_o_proj(t: torch.Tensor, plan: ServePlan, num_heads: int) -> torch.Tensor:
    """o_proj weight [D, H*dv] -> [D, H*dv'] with zero input columns."""
    src, dst = plan.source, plan.served
    if src.v_head_dim == dst.v_head_dim:
        return t
    out = t.new_zeros(t.shape[0], num_heads, dst.v_head_dim)
    out[:, :, : src.v_head_dim] = t.reshape(t.shape[0], num_heads, src.v_head_dim)
    return out.reshape(t.shape[0], -1)
