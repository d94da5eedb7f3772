"""Checks a converted folder must pass before it is published.

Once on the Hub a broken checkpoint fails for every downloader, far from where it was made, so
the upload refuses early and lists every problem at once. Everything here reads metadata only:
config.json, the safetensors index and file headers (``safe_open`` never loads weights), the
tokenizer files and the card.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from converter.hub.ids import HUB_ID
from transmla_vllm.checkpoint_format import (
    ARCHITECTURE,
    CARD_FILE,
    CONFIG_FILE,
    FORMAT_VERSION,
    INDEX_FILE,
    MODEL_TYPE,
    REMOTE_CODE_FILE,
    SINGLE_FILE,
    CheckpointLayout,
)

# Fields the vLLM plugin and the remote code read; transformers fills defaults for some of them
# (kv_lora_rank=512, ...), so they are checked in the raw JSON, not in the loaded config.
REQUIRED_CONFIG_FIELDS = (
    "hidden_size",
    "num_attention_heads",
    "num_hidden_layers",
    "vocab_size",
    "kv_lora_rank",
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "v_head_dim",
    "tie_word_embeddings",
)
REQUIRED_TRANSMLA_FIELDS = (
    "format_version",
    "q_bias",
    "kv_a_bias",
    "latent_norm",
    "method",
    "rope_dim",
    "kv_lora_rank",
)
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")


def validate_folder(folder: Path | str) -> list[str]:
    """Every problem that would make ``folder`` a broken Hub checkpoint; empty when fine."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    problems: list[str] = []
    config = _check_config(folder, problems)
    tensors = _check_weights(folder, problems)
    if config is not None and tensors is not None:
        try:
            _check_tensors(config, *tensors, problems)
        except (TypeError, ValueError) as exc:
            problems.append(f"{CONFIG_FILE} sizes are not integers ({exc})")
    _check_tokenizer(folder, problems)
    _check_card(folder, problems)
    _check_remote_code(folder, config, problems)
    return problems


def _preview(names: set[str] | list[str], limit: int = 4) -> str:
    ordered = sorted(names)
    shown = ", ".join(ordered[:limit])
    return shown + (f" and {len(ordered) - limit} more" if len(ordered) > limit else "")


def _check_config(folder: Path, problems: list[str]) -> dict[str, Any] | None:
    path = folder / CONFIG_FILE
    if not path.is_file():
        problems.append(f"{CONFIG_FILE} is missing")
        return None
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        problems.append(f"{CONFIG_FILE} is not valid JSON ({exc})")
        return None
    if not isinstance(config, dict):
        problems.append(f"{CONFIG_FILE} is not a JSON object")
        return None
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(folder)
    except Exception as exc:  # transformers raises many types; any of them blocks downloaders
        problems.append(
            f"{CONFIG_FILE} does not load with transformers AutoConfig "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        )
    if config.get("model_type") != MODEL_TYPE:
        problems.append(
            f"{CONFIG_FILE} has model_type {config.get('model_type')!r}, expected "
            f"{MODEL_TYPE!r} (vLLM switches MLA on by it)"
        )
    if ARCHITECTURE not in (config.get("architectures") or []):
        problems.append(
            f"{CONFIG_FILE} architectures {config.get('architectures')} do not name {ARCHITECTURE}"
        )
    missing = [f for f in REQUIRED_CONFIG_FIELDS if config.get(f) is None]
    if missing:
        problems.append(f"{CONFIG_FILE} lacks {', '.join(missing)}")
    tm = config.get("transmla")
    if not isinstance(tm, dict):
        problems.append(f"{CONFIG_FILE} has no 'transmla' block (not a TransMLA conversion)")
        return None if missing else config
    tm_missing = [f for f in REQUIRED_TRANSMLA_FIELDS if f not in tm]
    if tm_missing:
        problems.append(f"{CONFIG_FILE} 'transmla' block lacks {', '.join(tm_missing)}")
    version = tm.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        problems.append(
            f"{CONFIG_FILE} uses TransMLA format {version}, newer than this "
            f"converter's {FORMAT_VERSION}"
        )
    rank, tm_rank = config.get("kv_lora_rank"), tm.get("kv_lora_rank")
    if rank is not None and tm_rank is not None and rank != tm_rank:
        problems.append(
            f"{CONFIG_FILE} kv_lora_rank {rank} disagrees with the 'transmla' block's {tm_rank}"
        )
    return None if missing else config


def _header(path: Path, problems: list[str]) -> dict[str, tuple[int, ...]] | None:
    """Tensor names and shapes from a safetensors header (no weights are read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error type for a bad header
        problems.append(f"{path.name} is not a readable safetensors file ({exc})")
        return None


def _check_weights(
    folder: Path, problems: list[str]
) -> tuple[set[str], dict[str, tuple[int, ...]]] | None:
    """(names the checkpoint declares, shapes of those actually readable), or None."""
    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        if not (folder / SINGLE_FILE).is_file():
            problems.append(f"no weights: neither {SINGLE_FILE} nor {INDEX_FILE} is present")
            return None
        shapes = _header(folder / SINGLE_FILE, problems)
        return None if shapes is None else (set(shapes), shapes)
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        problems.append(f"{INDEX_FILE} is unreadable ({type(exc).__name__}: {exc})")
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for name in sorted(set(weight_map.values())):
        listed = {t for t, f in weight_map.items() if f == name}
        if not (folder / name).is_file():
            problems.append(f"{INDEX_FILE} names {name} ({len(listed)} tensors), which is missing")
            continue
        stored = _header(folder / name, problems)
        if stored is None:
            continue
        shapes.update(stored)
        absent = listed - set(stored)
        if absent:
            problems.append(
                f"{INDEX_FILE} maps {_preview(absent)} to {name}, which does not hold them"
            )
        unlisted = set(stored) - set(weight_map)
        if unlisted:
            problems.append(f"{name} holds {_preview(unlisted)}, not covered by {INDEX_FILE}")
        elsewhere = {t for t in stored if t in weight_map and weight_map[t] != name}
        if elsewhere:
            problems.append(
                f"{name} holds {_preview(elsewhere)}, which {INDEX_FILE} maps to another file"
            )
    stray = {p.name for p in folder.glob("*.safetensors")} - set(weight_map.values())
    if stray:
        problems.append(
            f"{_preview(stray)} not named by {INDEX_FILE} (would be uploaded and confuse loaders)"
        )
    return set(weight_map) | set(shapes), shapes


def _check_tensors(
    config: dict[str, Any], names: set[str], shapes: dict[str, tuple[int, ...]], problems: list[str]
) -> None:
    want = CheckpointLayout.from_config(config).tensors()
    expected = set(want)
    missing, extra = expected - names, names - expected
    if missing:
        problems.append(
            f"{len(missing)} tensor(s) the config implies are missing: {_preview(missing)}"
        )
    if extra:
        problems.append(
            f"{len(extra)} tensor(s) the config does not imply (vLLM's strict "
            f"load would refuse them): {_preview(extra)}"
        )
    wrong = [
        f"{name} {list(shape)} (config implies {list(want[name])})"
        for name, shape in shapes.items()
        if name in want and shape != want[name]
    ]
    if wrong:
        problems.append(
            f"{len(wrong)} tensor(s) disagree with config.json: "
            + "; ".join(wrong[:4])
            + (" ..." if len(wrong) > 4 else "")
        )


def _check_tokenizer(folder: Path, problems: list[str]) -> None:
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # a missing or broken tokenizer surfaces as many error types
        first = str(exc).splitlines()[0] if str(exc) else ""
        problems.append(
            f"the tokenizer does not load with AutoTokenizer ({type(exc).__name__}: {first[:200]})"
        )


def _check_card(folder: Path, problems: list[str]) -> None:
    path = folder / CARD_FILE
    if not path.is_file():
        problems.append(f"{CARD_FILE} (the model card) is missing")
        return
    import yaml
    from huggingface_hub import ModelCard

    try:
        card = ModelCard.load(path)  # a Path: never falls back to downloading
    except (ValueError, yaml.YAMLError) as exc:
        problems.append(f"{CARD_FILE} metadata does not parse ({str(exc).splitlines()[0]})")
        return
    meta = card.data.to_dict()
    if not meta:
        problems.append(f"{CARD_FILE} has no YAML metadata block")
        return
    bases = meta.get("base_model")
    for base in [bases] if isinstance(bases, str) else bases or []:
        if not isinstance(base, str) or not HUB_ID.match(base):
            problems.append(
                f"{CARD_FILE} base_model {base!r} is not a Hub model id (the Hub "
                "rejects local paths)"
            )
    relation = meta.get("base_model_relation")
    if relation is not None and relation not in BASE_MODEL_RELATIONS:
        problems.append(
            f"{CARD_FILE} base_model_relation {relation!r} is not one of "
            f"{', '.join(BASE_MODEL_RELATIONS)}"
        )
    if relation is not None and not bases:
        problems.append(f"{CARD_FILE} sets base_model_relation without base_model")


def _check_remote_code(folder: Path, config: dict[str, Any] | None, problems: list[str]) -> None:
    path = folder / REMOTE_CODE_FILE
    if not path.is_file():
        problems.append(
            f"{REMOTE_CODE_FILE} is missing (transformers needs it with trust_remote_code=True)"
        )
    else:
        try:
            compile(path.read_text(), str(path), "exec")
        except (SyntaxError, UnicodeDecodeError) as exc:
            problems.append(f"{REMOTE_CODE_FILE} is not valid Python ({exc})")
    if config is not None:
        auto = (config.get("auto_map") or {}).get("AutoModelForCausalLM", "")
        if not str(auto).startswith(Path(REMOTE_CODE_FILE).stem + "."):
            problems.append(
                f"{CONFIG_FILE} auto_map does not point AutoModelForCausalLM at {REMOTE_CODE_FILE}"
            )
