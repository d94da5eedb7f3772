"""The whole card from what is known about a checkpoint: front matter, then the Markdown body
(intro, KV cache, settings, heal, quality, usage, licence)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from converter.hub.card.kv import kv_section
from converter.hub.card.metadata import card_data
from converter.hub.card.snippets import LOCAL_MODEL_REF, usage_section
from converter.hub.card.source import SourceInfo
from converter.hub.card.tables import heal_section, quality_section, settings_section

if TYPE_CHECKING:
    from huggingface_hub import ModelCard


def compose_card(
    source: SourceInfo,
    config: dict[str, Any],
    summary: dict[str, Any],
    meta: dict[str, Any],
    verification: dict[str, Any] | None,
    repo_id: str | None,
    licence_file: str | None,
) -> ModelCard:
    """The card; ``repo_id`` names the model in the snippets (LOCAL_MODEL_REF until known),
    ``licence_file`` is the licence file shipped next to the card, if any."""
    from huggingface_hub import ModelCard

    data = card_data(meta, summary)
    tm = config.get("transmla") or {}
    intro = (
        f"# {source.name} with Multi-head Latent Attention\n\n"
        f"This is {source.ref} ({source.architecture}, grouped-query attention) converted to "
        f"Multi-head Latent Attention (the attention of DeepSeek-V2/V3) by "
        f"transmla-vllm "
        f"{tm.get('converter_version', '')}, "
        + ("then healed by distillation from it" if summary.get("heal") else "without training")
        + f". The KV cache keeps one latent "
        f"of {config['kv_lora_rank']} plus one shared rope key of "
        f"{config['qk_rope_head_dim']} per token and layer instead of per-head keys and "
        f"values; queries and outputs absorb the change, so vLLM serves it with its own MLA "
        f"kernels and paged latent cache.\n"
    )
    licence = (
        "## License\n\nThe source model's license applies"
        + (f" (`{data.license}`)" if getattr(data, "license", None) else "")
        + (f"; its `{licence_file}` is copied here" if licence_file else "")
        + ".\n"
    )
    parts = (
        intro,
        kv_section(config, summary),
        settings_section(source, config, summary),
        heal_section(summary.get("heal")),
        quality_section(verification),
        usage_section(repo_id or LOCAL_MODEL_REF),
        "Per-layer energy figures are in `transmla_report.json`; the format is the "
        "DeepSeek-V3 dense layout plus a `transmla` block in `config.json`.\n",
        licence,
    )
    body = "\n".join(p for p in parts if p)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
