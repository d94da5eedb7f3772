"""Source kinds the converter refuses before looking at geometry, and the wording of every
refusal: known unsupported families, checkpoints that are already MLA, quantized checkpoints."""

from __future__ import annotations

from typing import Any

from converter.errors import UnsupportedModelError
from converter.sources.adapter import FamilyAdapter
from converter.sources.registry import SUPPORTED

_QK_NORM = "per-head q/k RMSNorm before RoPE ({}) does not commute with the key rotation"
_WINDOW = "sliding-window layers ({}) are not supported"
_MOE = "mixture-of-experts MLPs ({}) are not supported"
_MLA = "the source is already MLA ({}); there is nothing to convert, serve it as it is"
# model_type -> why it cannot convert; named here so users get a reason, not "unknown".
KNOWN_REFUSALS = {
    "gemma3": "per-head q/k RMSNorm and sliding-window layers (Gemma-3) are not supported",
    "gemma3_text": "per-head q/k RMSNorm and sliding-window layers (Gemma-3) are not supported",
    "gemma2": "sliding-window layers and attention softcap (Gemma-2) are not supported",
    "gemma": "Gemma's GeLU MLP and (1 + w) RMSNorm weights are not supported",
    "olmo2": _QK_NORM.format("OLMo-2"),
    "cohere2": _WINDOW.format("Cohere2"),
    "deepseek_v2": _MLA.format("DeepSeek-V2"),
    "deepseek_v3": _MLA.format("DeepSeek-V3"),
    "kimi_k2": _MLA.format("Kimi-K2"),
    "mixtral": _MOE.format("Mixtral"),
    "qwen2_moe": _MOE.format("Qwen2-MoE"),
    "olmoe": _MOE.format("OLMoE"),
    "dbrx": _MOE.format("DBRX"),
}


def refuse(sentence: str) -> UnsupportedModelError:
    """A refusal that also says what does convert."""
    return UnsupportedModelError(f"{sentence}; only {SUPPORTED}")


def _already_mla(cfg: dict[str, Any]) -> bool:
    archs = cfg.get("architectures") or []
    return (
        "kv_lora_rank" in cfg
        or "transmla" in cfg
        or any(str(a).startswith(("Deepseek", "TransMLA")) for a in archs)
    )


def refuse_known_kinds(cfg: dict[str, Any]) -> None:
    """Raise for a listed model_type, an MLA checkpoint or a quantized one, whatever family
    the config otherwise claims."""
    model_type = cfg.get("model_type", "")
    archs = cfg.get("architectures") or []
    if model_type in KNOWN_REFUSALS:
        reason = KNOWN_REFUSALS[model_type]
        sentence = f"cannot convert model_type {model_type!r}: {reason}"
        # an MLA source needs no alternative: it can be served as it is
        raise (UnsupportedModelError(sentence) if "already MLA" in reason else refuse(sentence))
    if _already_mla(cfg):
        raise UnsupportedModelError(
            f"cannot convert model_type {model_type!r} (architectures {archs}): it is already "
            "MLA (kv_lora_rank or an MLA architecture in its config); serve it as it is"
        )
    quant = cfg.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise UnsupportedModelError(
            f"cannot convert a quantized checkpoint (quant_method "
            f"{method!r}); convert the bf16/fp16 original instead"
        )


def refuse_features(adapter: FamilyAdapter, cfg: dict[str, Any]) -> None:
    """Raise with every feature of this family's config that cannot be converted."""
    reasons = adapter.refuse_reasons(cfg)
    if reasons:
        raise refuse(f"cannot convert this {adapter.family} model: " + "; ".join(reasons))
