"""KV cache arithmetic for ``python -m converter inspect``: bytes per token and what fits.

Pure functions over config.json dicts, no vLLM import, so the numbers can be checked anywhere
(and before a GPU is rented). What each backend serves comes from ``transmla_vllm.backends``
(the plugin pads to the same sizes at load): fixed-shape kernels serve only latent 512 + rope
64; TRITON_MLA takes the smallest accepted head size, with the rope padded to 64 as every GPU
prefill kernel needs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from converter.errors import ConversionError
from converter.sizes import parse_bytes
from transmla_vllm.backends import BACKENDS, GPU_PREFILL_ROPE_DIM, Backend, served_split
from transmla_vllm.checkpoint_format import (
    ARCHITECTURE,
    CONFIG_FILE,
    MODEL_TYPE,
    qk_norm,
    shape_from_config,
)

# Label suffix for sources with per-head q/k RMSNorm (Qwen3): same cache, normed projections.
_QK_NORM_NOTE = " (q/k norm kept)"
# Bytes per cache element for the dtypes vLLM can hold a KV cache in (fp8: --kv-cache-dtype).
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}
FP8_BYTES = DTYPE_BYTES["fp8"]


@dataclass(frozen=True)
class CacheRow:
    """One way of holding the KV cache: its per-token size and what fits in the budget."""

    name: str
    label: str
    elements_per_token_per_layer: int | None  # None: no kernel of this backend serves it
    bytes_per_token_per_layer: int | None = None
    bytes_per_token: int | None = None
    tokens: int | None = None
    requests: int | None = None
    capacity_vs_original: float | None = None
    note: str = ""
    # the same layout in an fp8 cache (--kv-cache-dtype fp8), where the backend serves one;
    # "vs original" compares with the original GQA cache in the budget's dtype
    fp8: str = ""  # backends.Backend.fp8_mark; empty for the original and checkpoint rows
    fp8_tokens: int | None = None
    fp8_requests: int | None = None
    fp8_capacity_vs_original: float | None = None


@dataclass(frozen=True)
class KVBudget:
    """Everything ``inspect`` prints: the folder, the served dtype, the budget, one row per
    cache layout (original first)."""

    folder: str
    kind: str  # "source" or "converted"
    architecture: str
    layers: int
    dtype: str
    bytes_per_element: int
    kv_memory_bytes: int
    context: int
    rows: list[CacheRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_memory(text: str) -> int:
    """--kv-memory: '8GiB', '512MiB', '8GB' or a plain byte count -> bytes."""
    return parse_bytes(text, "--kv-memory")


def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ConversionError(f"--dtype {dtype!r} is not one of {sorted(DTYPE_BYTES)}") from None


def cache_bytes(elements: int, layers: int, bytes_per_element: int, tokens: int = 1) -> int:
    """Bytes of KV cache ``tokens`` tokens take at ``elements`` per token and layer: the one
    formula ``inspect``, its capacities and the model card all use."""
    return elements * layers * bytes_per_element * tokens


def capacity(
    elements: int, layers: int, bytes_per_element: int, kv_memory: int, context: int
) -> tuple[int, int]:
    """(tokens, whole requests of ``context`` tokens) that fit in ``kv_memory`` bytes.

    vLLM rounds further down to whole blocks (16 tokens on GPU); that is under 0.1% here.
    """
    tokens = kv_memory // cache_bytes(elements, layers, bytes_per_element)
    return tokens, tokens // context


def served_splits(kv_lora_rank: int, rope_dim: int) -> list[tuple[Backend, tuple[int, int] | None]]:
    """Each backend with the (latent, rope) it serves this shape at after the plugin's zero
    padding, None where it cannot serve it as MLA (``inspect`` rows, the card's padding note)."""
    return [(b, served_split(kv_lora_rank, rope_dim, b.name)) for b in BACKENDS]


def _row(
    name: str,
    label: str,
    elements: int | None,
    budget: KVBudget,
    original_elements: int | None,
    note: str = "",
    fp8: Backend | None = None,
) -> CacheRow:
    """``capacity_vs_original`` is the exact byte ratio (tokens differ only by rounding).
    ``fp8``: the backend of this row, whose fp8 cache capacity is added when it serves one."""
    mark = fp8.fp8_mark if fp8 else ""
    if elements is None:
        return CacheRow(name, label, None, note=note, fp8=mark)
    fp8_numbers: dict[str, Any] = {}
    if fp8 is not None and fp8.fp8_cache:
        tokens8, requests8 = capacity(
            elements, budget.layers, FP8_BYTES, budget.kv_memory_bytes, budget.context
        )
        ratio8 = (original_elements or elements) * budget.bytes_per_element / elements / FP8_BYTES
        fp8_numbers = dict(
            fp8_tokens=tokens8, fp8_requests=requests8, fp8_capacity_vs_original=round(ratio8, 4)
        )
    per_layer = cache_bytes(elements, 1, budget.bytes_per_element)
    tokens, requests = capacity(
        elements, budget.layers, budget.bytes_per_element, budget.kv_memory_bytes, budget.context
    )
    ratio = original_elements / elements if original_elements else 1.0
    return CacheRow(
        name,
        label,
        elements,
        per_layer,
        cache_bytes(elements, budget.layers, budget.bytes_per_element),
        tokens,
        requests,
        round(ratio, 4),
        note,
        mark,
        **fp8_numbers,
    )


def read_folder_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ConversionError(f"{folder} has no config.json; pass a model folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path} is not valid JSON: {exc}") from exc


def is_converted(cfg: dict[str, Any]) -> bool:
    return cfg.get("model_type") == MODEL_TYPE and isinstance(cfg.get("transmla"), dict)


def _config_dtype(cfg: dict[str, Any]) -> str:
    return str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").replace("torch.", "")


@dataclass(frozen=True)
class _Geometry:
    kind: str
    architecture: str
    layers: int
    kv_heads: int
    head_dim: int
    kv_lora_rank: int
    rope_dim: int
    label: str


def _geometry(cfg: dict[str, Any], rope_dim: int | None, kv_lora_rank: int) -> _Geometry:
    """Source GQA geometry and MLA ranks: recorded ones for a converted folder, the ones a
    conversion with these flags would use (clipped like the converter) for a source folder."""
    layers = int(cfg["num_hidden_layers"])
    if is_converted(cfg):
        block = cfg["transmla"]
        try:
            shape = shape_from_config(cfg)
            kv_heads, head_dim = int(block["source_kv_heads"]), int(block["source_head_dim"])
        except (ValueError, KeyError) as exc:
            raise ConversionError(f"converted config is incomplete: {exc}") from exc
        rho, r = shape.kv_lora_rank, shape.qk_rope_head_dim
        arch = (cfg.get("architectures") or [ARCHITECTURE])[0]
        return _Geometry(
            "converted",
            arch,
            layers,
            kv_heads,
            head_dim,
            rho,
            r,
            f"converted latent {rho} + rope {r}{_QK_NORM_NOTE if qk_norm(cfg) else ''}",
        )
    from converter.conversion.settings import resolve_settings
    from converter.sources.inspection import inspect_source

    spec = inspect_source(cfg)
    # target hf: preview any shape, and show per backend what serves it (None where none does)
    settings = resolve_settings(spec, rope_dim, kv_lora_rank, None, "float32", target="hf")
    rho, r = settings.kv_lora_rank, settings.rope_dim
    return _Geometry(
        "source",
        spec.architecture,
        layers,
        spec.num_kv_heads,
        spec.head_dim,
        rho,
        r,
        f"if converted: latent {rho} + rope {r}{_QK_NORM_NOTE if spec.qk_norm else ''}",
    )


def kv_budget(
    folder: Path,
    *,
    dtype: str | None = None,
    kv_memory: int = 8 * 2**30,
    context: int = 4096,
    rope_dim: int | None = None,
    kv_lora_rank: int = 512,
) -> KVBudget:
    """KV cache sizes and capacity of a source folder (with a conversion preview using
    ``rope_dim`` / ``kv_lora_rank``) or of a converted folder (against its recorded source)."""
    if context <= 0:
        raise ConversionError(f"--context {context} must be positive")
    cfg = read_folder_config(folder)
    geo = _geometry(cfg, rope_dim, kv_lora_rank)
    dtype = dtype or _config_dtype(cfg)
    budget = KVBudget(
        str(folder),
        geo.kind,
        geo.architecture,
        geo.layers,
        dtype,
        dtype_bytes(dtype),
        kv_memory,
        context,
    )
    rho, r = geo.kv_lora_rank, geo.rope_dim
    gqa = 2 * geo.kv_heads * geo.head_dim
    rows = [
        _row("original", f"original GQA 2 x {geo.kv_heads} x {geo.head_dim}", gqa, budget, None),
        _row(
            "converted",
            geo.label,
            rho + r,
            budget,
            gqa,
            note="checkpoint size, before backend padding",
        ),
    ]
    for backend, split in served_splits(rho, r):
        if split is None:
            rows.append(
                _row(
                    backend.name,
                    f"served on {backend.name}",
                    None,
                    budget,
                    gqa,
                    note="no kernel of this backend serves this shape",
                    fp8=backend,
                )
            )
            continue
        note = ""
        if backend.gpu and not backend.fixed_split and r != GPU_PREFILL_ROPE_DIM:
            note = f"rope {r} zero-padded to {GPU_PREFILL_ROPE_DIM}, as every GPU prefill needs"
        rows.append(
            _row(
                backend.name,
                f"served on {backend.name}: {split[0]} + {split[1]}",
                sum(split),
                budget,
                gqa,
                note=note,
                fp8=backend,
            )
        )
    return replace(budget, rows=rows)


def format_table(budget: KVBudget) -> str:
    """A small aligned text table of the budget (what the CLI prints without --json)."""
    head = (
        f"{budget.folder}: {budget.kind} {budget.architecture}, {budget.layers} layers, "
        f"KV dtype {budget.dtype} ({budget.bytes_per_element} B/element)\n"
        f"budget {budget.kv_memory_bytes:,} bytes ({budget.kv_memory_bytes / 2**30:.2f} "
        f"GiB), context {budget.context:,} tokens\n"
    )
    cols = (
        "cache layout",
        "elem/tok/layer",
        "B/tok/layer",
        "B/tok (all layers)",
        "tokens fit",
        f"requests x {budget.context}",
        "vs original",
        "fp8 tokens fit",
        "fp8 vs original",
        "fp8 cache",
    )
    lines = [cols]
    for row in budget.rows:
        if row.elements_per_token_per_layer is None:
            lines.append((row.label, "-", "-", "-", "-", "-", "not servable", "-", "-", row.fp8))
            continue
        fp8_cells = (
            (f"{row.fp8_tokens:,}", f"{row.fp8_capacity_vs_original:.2f}x")
            if row.fp8_tokens is not None
            else ("-", "-")
        )
        lines.append(
            (
                row.label,
                f"{row.elements_per_token_per_layer:,}",
                f"{row.bytes_per_token_per_layer:,}",
                f"{row.bytes_per_token:,}",
                f"{row.tokens:,}",
                f"{row.requests:,}",
                f"{row.capacity_vs_original:.2f}x",
                *fp8_cells,
                row.fp8,
            )
        )
    widths = [max(len(r[i]) for r in lines) for i in range(len(cols))]
    out = []
    for n, r in enumerate(lines):
        cells = (
            [r[0].ljust(widths[0])]
            + [c.rjust(w) for c, w in zip(r[1:-1], widths[1:-1], strict=True)]
            + [r[-1]]
        )
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    notes = [f"{r.name}: {r.note}" for r in budget.rows if r.note and r.name != "converted"]
    notes.append(
        "fp8 columns: the same layout with --kv-cache-dtype fp8 (1 B/element), against the "
        f"original in {budget.dtype}; "
        + ", ".join(b.name for b in BACKENDS if not b.fp8_cache)
        + " serve no fp8 cache"
    )
    tail = "\n".join(f"  {n}" for n in notes)
    return head + "\n" + "\n".join(out) + ("\n\nnotes:\n" + tail if notes else "") + "\n"
