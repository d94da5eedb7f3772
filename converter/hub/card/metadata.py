"""The card's YAML front matter, built with huggingface_hub's own ``ModelCardData`` so it is
exactly what the Hub parses (model tree, license, library and pipeline widgets)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from huggingface_hub import ModelCardData

TAGS = ["mla", "transmla", "vllm", "deepseek_v3"]
# The Hub accepts base_model_relation adapter / merge / quantized / finetune. A TransMLA
# conversion is a calibration-based, post-training compression of the source's own weights (no
# adapter, nothing merged in), the same kind of derivation as GPTQ / AWQ quantization;
# "finetune" would claim training that never happened. "quantized" is the closest honest value,
# and it lists the model under the base model's compressed variants, where people looking for a
# cheaper-to-serve version of it look. A healed checkpoint was trained (distillation on text):
# that one is a "finetune".
BASE_MODEL_RELATION = "quantized"
HEALED_RELATION = "finetune"


def base_model_relation(summary: dict[str, Any]) -> str:
    """The Hub relation of a checkpoint to its source: trained by heal or not."""
    return HEALED_RELATION if summary.get("heal") else BASE_MODEL_RELATION


def card_data(meta: dict[str, Any], summary: dict[str, Any]) -> ModelCardData:
    """``meta`` (base model, licence, whatever a user added) with the relation this checkpoint
    has to its base model, our tags after the user's and the transformers text-generation
    widgets. The relation is always recomputed: a card refreshed after heal becomes a
    finetune."""
    from huggingface_hub import ModelCardData

    if meta.get("base_model"):
        meta = {**meta, "base_model_relation": base_model_relation(summary)}
    tags = list(dict.fromkeys([*(meta.get("tags") or []), *TAGS]))
    return ModelCardData(
        **{**meta, "library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags}
    )
