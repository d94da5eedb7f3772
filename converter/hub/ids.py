"""Hugging Face Hub ids: the pattern the Hub accepts for a repo id, and the id of a source
model when the user gave one (as --src, or as the huggingface_hub cache folder it lives in)."""

from __future__ import annotations

import re
from pathlib import Path

from converter.errors import ConversionError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CACHE_DIR = re.compile(r"^models--(?P<owner>.+?)--(?P<name>.+)$")  # huggingface_hub cache


def source_hub_id(src_arg: str, src_path: Path | str) -> str | None:
    """The source's Hub id, or None for a local folder that is not a Hub cache snapshot.

    The Hub rejects a base_model that is not a model id, so a local path never goes in the YAML.
    """
    if not Path(src_arg).expanduser().exists() and HUB_ID.match(src_arg):
        return src_arg
    for part in Path(src_path).expanduser().resolve().parts:  # models--owner--name/snapshots
        m = CACHE_DIR.match(part)
        if m:
            return f"{m['owner']}/{m['name']}"
    return None


def check_base_model(base_model: str) -> None:
    """--base-model must be a Hub model id: the Hub rejects a card whose base_model is not."""
    if not HUB_ID.match(base_model or "") or ".." in base_model:
        raise ConversionError(
            f"--base-model {base_model!r} is not a Hub model id: use the "
            "source's OWNER/NAME on the Hub (e.g. meta-llama/Llama-3.1-8B)"
        )
