"""Calibration: text -> token chunks -> per-layer second moments of the [k; v] projections.

Only (2L, 2L) fp64 second moments are kept per layer (captured after bias, before RoPE), which is
all the rotation and the joint PCA need; no activations are stored.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from converter.errors import ConversionError

log = logging.getLogger(__name__)
TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")


def read_calibration_text(path: str | Path) -> tuple[str, list[str]]:
    """UTF-8 text of a file, or of every text file under a folder (sorted, for reproducibility)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ConversionError(f"calibration folder {path} holds no {TEXT_SUFFIXES} files")
    elif path.is_file():
        files = [path]
    else:
        raise ConversionError(f"calibration text {path} does not exist")
    parts = []
    for f in files:
        try:
            parts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ConversionError(f"calibration file {f} is not UTF-8 text ({exc.reason})") from exc
    return "\n\n".join(parts), [str(f) for f in files]


def token_chunks(tokenizer, text: str, samples: int, seqlen: int) -> torch.Tensor:
    """Up to ``samples`` non-overlapping chunks of ``seqlen`` tokens spread over the text.

    Each chunk starts with BOS when the tokenizer has one, as the model saw text in training.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    body = seqlen - (1 if bos is not None else 0)
    available = len(ids) // body if body > 0 else 0
    if available < 1:
        raise ConversionError(f"calibration text is too short: {len(ids)} tokens found, at least "
                              f"{body} needed for one chunk of --calib-seqlen {seqlen}")
    count = min(samples, available)
    if count < samples:
        log.warning("calibration text gives only %d chunks of %d tokens (asked for %d); "
                    "using %d", available, seqlen, samples, count)
    stride = available // count
    rows = []
    for i in range(count):
        start = i * stride * body
        chunk = ids[start:start + body]
        rows.append(([bos] if bos is not None else []) + chunk)
    return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def kv_second_moments(model, chunks: torch.Tensor, batch_size: int = 8,
                      device: str = "cpu") -> list[torch.Tensor]:
    """Run the source model on the chunks and return, per layer, E-less sum of [k; v][k; v]^T."""
    layers = model.model.layers
    grams: list[torch.Tensor | None] = [None] * len(layers)
    captured: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(layers):
        for name in ("k_proj", "v_proj"):
            def hook(_mod, _inp, out, key=(i, name)):
                captured[key] = out.detach()
            hooks.append(getattr(layer.self_attn, name).register_forward_hook(hook))
    try:
        for start in tqdm(range(0, len(chunks), batch_size), desc="calibration", unit="batch"):
            batch = chunks[start:start + batch_size].to(device)
            model(input_ids=batch, use_cache=False)
            for i in range(len(layers)):
                kv = torch.cat([captured[(i, "k_proj")], captured[(i, "v_proj")]], -1)
                kv = kv.reshape(-1, kv.shape[-1]).to(torch.float64)
                g = kv.T @ kv
                grams[i] = g if grams[i] is None else grams[i] + g
            captured.clear()
    finally:
        for h in hooks:
            h.remove()
    return [g.cpu() for g in grams]
