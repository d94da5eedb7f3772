"""The card's tables: how the checkpoint was made (settings, calibration, energy kept), how
good it is against the source (``verify``), and what ``heal`` did. Rendered from config.json's
``transmla`` block and the conversion report alone, so a refresh needs no source at hand."""

from __future__ import annotations

from typing import Any

from converter.hub.card.source import SourceInfo
from converter.measure.lm_eval_compare import comparison_rows
from transmla_vllm.checkpoint_format import moe_mlp, qk_norm

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


def settings_section(source: SourceInfo, config: dict[str, Any], summary: dict[str, Any]) -> str:
    """ "How it was made": source, method, shape, calibration (never a local path), energy kept."""
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


def quality_section(verification: dict[str, Any] | None) -> str:
    """``verify``'s figures, or how to get them when none were recorded."""
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
    table = head + "| metric | value |\n|---|---:|\n" + "\n".join(rows) + "\n"
    return table + lm_eval_table(verification.get("lm_eval"))


def lm_eval_table(comparison: dict[str, Any] | None) -> str:
    """``verify --lm-eval-tasks``'s scores, source and converted side by side."""
    if not comparison:
        return ""
    limit = comparison.get("limit")
    rows = "\n".join(
        f"| {task} | {metric} | {s:.4f} | {c:.4f} | {c - s:+.4f} |"
        for task, metric, s, c in comparison_rows(comparison)
    )
    return (
        f"\nlm-evaluation-harness, {comparison['backend']} backend"
        + (f", first {limit} items of each task" if limit else "")
        + ":\n\n| task | metric | source | converted | change |\n|---|---|---:|---:|---:|\n"
        + rows
        + "\n"
    )


def launch_text(launch: dict[str, Any] | None) -> str:
    """How a heal was launched (its report's settings.launch, heal/distributed.py)."""
    if not launch or launch.get("ranks", 1) == 1:
        return "one process"
    return (
        f"torchrun, {launch['ranks']} ranks on {launch.get('nodes', 1)} node(s), "
        f"{launch.get('backend')}, FSDP2 (batch is the global batch)"
    )


def heal_section(heal: dict[str, Any] | None) -> str:
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
        ("training text", st.get("text", "-")),
        ("learning rate, batch", f"{st.get('lr', '?')}, {st.get('batch_size', '?')} sequences"),
        ("launch", launch_text(st.get("launch"))),
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
    plot = heal.get("plot")
    picture = f"\n![held-out perplexity and KL against heal tokens]({plot})\n" if plot else ""
    return (
        "## Heal\n\nAfter conversion the attention was trained by distillation from the source "
        "(`python -m converter heal`); the step with the best validation perplexity was kept, "
        "and the test perplexity below was measured on the weights as written.\n\n"
        f"| setting | value |\n|---|---|\n{table}\n{picture}"
    )
