"""The card builders: at conversion time from the SourceSpec and the source folder, and later
from the converted folder alone (its config.json, transmla_report.json and current card), so
``verify`` and ``heal`` can rewrite the body while keeping the metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from converter.hub.card.compose import compose_card
from converter.hub.card.source import SourceInfo, source_name
from converter.hub.ids import source_hub_id
from converter.hub.licence import licence_file, source_license
from transmla_vllm.checkpoint_format import CARD_FILE, CONFIG_FILE, REPORT_FILE

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

    from converter.sources.spec import SourceSpec


def _card(
    config: dict[str, Any],
    summary: dict[str, Any],
    meta: dict[str, Any],
    geometry: tuple[str, int | None, int | None, int | None],
    src_arg: str,
    src_path: Path | str | None,
    *,
    base_model: str | None = None,
    verification: dict[str, Any] | None = None,
    repo_id: str | None = None,
    licence_folders: tuple[Path, ...] = (),
) -> ModelCard:
    """The setup both builders share once their inputs are read: settle the source's Hub id,
    name it as base_model unless the card already names one, describe the source, compose.

    The Hub id is ``base_model`` (a flag), else the card's own base_model, else the config's
    ``transmla.base_model``, else the id --src names (``src_arg``, a Hub id, or ``src_path``, a
    Hub cache snapshot). ``geometry`` is the source's architecture, query heads, KV heads and
    head_dim; ``verification`` defaults to the report's; the licence file is the first found in
    ``licence_folders``.
    """
    bases = meta.get("base_model")
    hub_id = base_model or (bases if isinstance(bases, str) else (bases[0] if bases else None))
    if hub_id is None:
        recorded = (config.get("transmla") or {}).get("base_model")
        found = source_hub_id(src_arg, src_path) if src_path is not None else None
        hub_id = recorded or found
    if hub_id and (base_model or not bases):
        meta = {**meta, "base_model": hub_id}
    source = SourceInfo(hub_id, source_name(hub_id, src_arg), *geometry)
    if verification is None:
        verification = summary.get("verification")
    licence = licence_file(*licence_folders)
    return compose_card(source, config, summary, meta, verification, repo_id, licence)


def build_model_card(
    spec: SourceSpec,
    config: dict[str, Any],
    summary: dict[str, Any],
    src_arg: str,
    src_path: Path,
    *,
    verification: dict[str, Any] | None = None,
    repo_id: str | None = None,
    folder: Path | None = None,
) -> ModelCard:
    """The card at conversion time, from the SourceSpec and the source folder (its licence)."""
    return _card(
        config,
        summary,
        source_license(src_path),
        (spec.architecture, spec.num_heads, spec.num_kv_heads, spec.head_dim),
        src_arg,
        src_path,
        verification=verification,
        repo_id=repo_id,
        licence_folders=tuple(p for p in (folder, src_path) if p is not None),
    )


def write_model_card(
    folder: Path,
    spec: SourceSpec,
    config: dict[str, Any],
    summary: dict[str, Any],
    src_arg: str,
    src_path: Path,
    *,
    verification: dict[str, Any] | None = None,
    repo_id: str | None = None,
) -> None:
    """Write README.md into ``folder`` (called by the pipeline at conversion time).

    ``verification`` (default: ``summary["verification"]``) may hold the keys of
    VERIFICATION_ROWS: ppl_source, ppl_converted, top1_agreement (0-1), mean_kl (nats), tokens,
    ctx, text. ``repo_id`` names the model in the usage snippets; without it they use
    LOCAL_MODEL_REF, which ``converter.hub.push_folder`` replaces by the Hub id on upload.
    """
    card = build_model_card(
        spec,
        config,
        summary,
        src_arg,
        src_path,
        verification=verification,
        repo_id=repo_id,
        folder=Path(folder),
    )
    card.save(Path(folder) / CARD_FILE)


def render_model_card(
    folder: Path, *, repo_id: str | None = None, base_model: str | None = None
) -> ModelCard:
    """``folder``'s card rebuilt from its config.json and transmla_report.json, keeping the
    current card's metadata (license, anything a user added). ``base_model`` (a Hub id) names
    the source; otherwise the card's, the config's ``transmla.base_model`` or a Hub id given as
    --src is used."""
    from huggingface_hub.repocard import metadata_load

    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    report = folder / REPORT_FILE
    summary = json.loads(report.read_text()) if report.is_file() else {}
    card = folder / CARD_FILE
    try:
        meta = (metadata_load(card) if card.is_file() else None) or {}
    except ValueError:
        meta = {}
    tm = config.get("transmla") or {}
    src_arg = str(tm.get("source") or "")
    return _card(
        config,
        summary,
        meta,
        (
            str(tm.get("source_architecture", "the source architecture")),
            config.get("num_attention_heads"),
            tm.get("source_kv_heads"),
            tm.get("source_head_dim"),
        ),
        src_arg,
        src_arg or None,
        base_model=base_model,
        repo_id=repo_id,
        licence_folders=(folder,),
    )


def refresh_model_card(folder: Path, *, repo_id: str | None = None) -> None:
    """Rewrite ``folder``'s README.md from its config.json and transmla_report.json (e.g. after
    ``verify`` stored figures in the report), keeping the card's metadata (base model, license,
    anything a user added). The body is regenerated: edits to it are lost."""
    render_model_card(folder, repo_id=repo_id).save(Path(folder) / CARD_FILE)
