"""The source model's licence, which a converted checkpoint inherits: what the source declares
(its card's YAML, else its config.json) and which licence file a folder holds, so the card can
state both without the source's weights at hand."""

from __future__ import annotations

import json
from pathlib import Path

from transmla_vllm.checkpoint_format import CARD_FILE, CONFIG_FILE

# The Hub's licence keys: license, plus license_name / license_link when it is "other".
LICENSE_KEYS = ("license", "license_name", "license_link")
# Licence files a model folder may hold (copy_verbatim copies the same names from the source).
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md")


def source_license(src_path: Path) -> dict[str, str]:
    """license (and license_name / license_link for "other") from the source's card YAML, else
    from its config.json; empty when neither says."""
    readme = Path(src_path) / CARD_FILE
    if readme.is_file():
        import yaml
        from huggingface_hub.repocard import metadata_load

        try:
            meta = metadata_load(readme) or {}
        except (ValueError, yaml.YAMLError, UnicodeDecodeError):
            meta = {}
        found = {k: str(meta[k]) for k in LICENSE_KEYS if meta.get(k)}
        if "license" in found:
            return found
    config = Path(src_path) / CONFIG_FILE
    try:
        value = json.loads(config.read_text()).get("license")
    except (OSError, ValueError, AttributeError):
        value = None
    return {"license": str(value)} if value else {}


def licence_file(*folders: Path) -> str | None:
    """The name of the first licence file found in ``folders``, searched in order."""
    return next((n for f in folders for n in LICENSE_FILES if (Path(f) / n).is_file()), None)
