"""Find and open a source checkpoint: a local folder, or a hub id fetched for the user."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from converter.errors import ConversionError

log = logging.getLogger(__name__)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "LICENSE*", "README.md"]


def resolve_source(src: str, revision: str | None = None) -> Path:
    """Local folder as is; otherwise treat ``src`` as a hub id and download its safetensors."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConversionError(f"--src {src} is a file; pass the model folder")
        return path
    if src.count("/") != 1 or src.startswith((".", "/")):
        raise ConversionError(f"--src {src} is neither an existing folder nor a hub id "
                              "(owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    log.info("downloading %s from the Hugging Face Hub", src)
    try:
        return Path(snapshot_download(src, revision=revision, allow_patterns=HUB_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise ConversionError(f"could not download {src} from the hub: {exc}") from exc


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(f"{folder} has no config.json; pass a transformers model folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path} is not valid JSON: {exc}") from exc


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"could not load the tokenizer from {folder}: {exc}") from exc
