"""Find and open a source checkpoint: a local folder, or a hub id fetched for the user."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from converter.errors import ConversionError
from transmla_vllm.checkpoint_format import CARD_FILE, CONFIG_FILE

log = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "LICENSE*", CARD_FILE]


def resolve_source(src: str, revision: str | None = None) -> Path:
    """Local folder as is; otherwise treat ``src`` as a hub id and download its safetensors."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConversionError(f"--src {src} is a file; pass the model folder")
        return path
    if src.count("/") != 1 or src.startswith((".", "/")):
        raise ConversionError(
            f"--src {src} is neither an existing folder nor a hub id (owner/name)"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    log.info("downloading %s from the Hugging Face Hub", src)
    try:
        return Path(snapshot_download(src, revision=revision, allow_patterns=HUB_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise ConversionError(f"could not download {src} from the hub: {exc}") from exc


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ConversionError(f"{folder} has no config.json; pass a transformers model folder")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConversionError(
            f"{path} is not valid JSON ({exc}); restore the model's original config.json"
        ) from exc
    except OSError as exc:
        raise ConversionError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not isinstance(cfg, dict):
        raise ConversionError(
            f"{path} holds a JSON {type(cfg).__name__}, not an object; "
            "restore the model's original config.json"
        )
    return cfg


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConversionError(
            f"{folder} has no tokenizer ({' / '.join(TOKENIZER_FILES)}); "
            "copy the source model's tokenizer files into it"
        )
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConversionError(
            f"could not load the tokenizer from {folder} ({first}); copy "
            "the source model's tokenizer files into it"
        ) from exc
