"""fp8 latent cache benchmark: what vLLM's `--kv-cache-dtype fp8` does to converted SmolLM2.

The protocol of benchmarks/quality.py (calibrate on the Shakespeare comedies, perplexity on the
tragedies, fp32, transformers); the fp8 cache is converter/measure/fp8_cache.py's simulation of
vLLM's (docs/fp8_cache.md): every position scored as a decoded token reading the cache back. Per
budget, in one run: the unquantized cache, fp8 as FLASHMLA / FLASHINFER_MLA run it (absorbed
query in e4m3 too), fp8 as TRITON_MLA runs it (query in model dtype), and FLASHMLA-style fp8 on
the same checkpoint with the conversion's fp8 scales taken out (what the cache would hold
without them). Then, per layer, where the cached values sit in e4m3's range.

    python benchmarks/fp8_cache.py    # writes the "fp8_cache" section of docs/benchmarks.md
    python benchmarks/fp8_cache.py --budgets 128 --eval-tokens 4096 --no-write   # quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from quality import convert  # the quality benchmark's conversion command (same folder)

from transmla_testing.report import publish
from transmla_testing.tragedies import add_common_args, tragedies
from transmla_vllm.checkpoint_format import CONFIG_FILE

ROOT = Path(__file__).resolve().parent.parent
SMALLEST_NORMAL = 2.0**-6  # e4m3: below this the grid is subnormal (fixed step 2^-9)


def unscale(model, report: dict) -> None:
    """Take the conversion's fp8 scales out of a loaded model (exact: powers of two)."""
    from converter.math.fp8_scales import Fp8Scales, apply_fp8_scales

    for layer, entry in zip(model.model.layers, report["layers"], strict=True):
        chosen = entry.get("fp8_scales")
        if not chosen:
            continue
        attn = layer.self_attn
        scales = Fp8Scales(chosen["latent_log2"], chosen["rope_pair_log2"])
        state = {f"self_attn.{k}": v for k, v in attn.state_dict().items()}
        folded = apply_fp8_scales(state, scales, attn.num_heads, attn.nope_dim, inverse=True)
        attn.load_state_dict({k.removeprefix("self_attn."): v for k, v in folded.items()})


@torch.no_grad()
def ranges(model, batch: torch.Tensor) -> list[dict]:
    """Per layer, over ``batch``: largest latent / rope key / absorbed query, the latent's
    99.9th percentile (outliers: max / p99.9) and its share of values below 2^-6."""
    from converter.conversion.fp8_scaling import cache_maxima

    seen: dict[int, list[torch.Tensor]] = {}
    hooks = [
        layer.self_attn.register_forward_pre_hook(
            lambda _m, args, i=i: seen.setdefault(i, []).append(args[0])
        )
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        for row in batch:
            model(row[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        maxima = cache_maxima(attn, seen[i])
        latent = torch.cat([attn.project(x)[1][..., : attn.rank].flatten() for x in seen[i]])
        mags = latent.abs().double()
        p999 = float(torch.quantile(mags[:: max(1, mags.numel() // 2**24)], 0.999))
        out.append(
            {
                "layer": i,
                "latent_max": float(maxima.latent.max()),
                "latent_p999": p999,
                "latent_subnormal": float((mags < SMALLEST_NORMAL).double().mean()),
                "rope_key_max": float(maxima.rope_key.max()),
                "query_max": float(maxima.query.max()),
            }
        )
    return out


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # 384: SmolLM2's full rank, latent 320 + rope 64
    add_common_args(p, ROOT / ".cache" / "fp8_cache", "128,192,320,384", 10240)
    p.add_argument("--range-windows", type=int, default=4, help="windows for the range table")
    p.add_argument("--method", default="refit:auto", help="method[:freqfold] to convert with")
    args = p.parse_args()

    from converter.measure.perplexity import load_model, perplexity

    started = time.time()
    setup = tragedies(args)
    work, src, batch, tokens = setup.work, setup.src, setup.batch, setup.tokens
    ppl_src = setup.source_ppl
    method, _, fold = args.method.partition(":")
    rows, layer_ranges = [], {}
    for budget in (int(b) for b in args.budgets.split(",")):
        dst = work / f"smollm2-{budget}"
        report = convert(src, dst, budget, method, fold or None, args.calib_samples)
        cfg = json.loads((dst / CONFIG_FILE).read_text())
        row = {"budget": budget, "rope": cfg["qk_rope_head_dim"], "rank": cfg["kv_lora_rank"]}
        row["auto"] = perplexity(load_model(dst), batch, desc="auto")
        row["fp8"] = perplexity(load_model(dst, "fp8"), batch, desc="fp8")
        row["fp8_triton"] = perplexity(load_model(dst, "fp8", fp8_query=False), batch, desc="fp8")
        unscaled = load_model(dst, "fp8")
        unscale(unscaled, report)
        row["fp8_unscaled"] = perplexity(unscaled, batch, desc="fp8 unscaled")
        del unscaled
        # ranges on the unquantized model: the same hidden states reach both versions
        plain = load_model(dst)
        scaled_ranges = ranges(plain, batch[: args.range_windows])
        unscale(plain, report)
        layer_ranges[budget] = {
            "scaled": scaled_ranges,
            "unscaled": ranges(plain, batch[: args.range_windows]),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    (work / "results.json").write_text(
        json.dumps({"source_ppl": ppl_src, "rows": rows, "ranges": layer_ranges}, indent=2)
    )

    def pct(a: float, b: float) -> str:
        return f"{100 * (a / b - 1):+.2f}%"

    lines = [
        "## fp8 latent cache (SmolLM2-135M-Instruct, simulated, CPU)",
        "",
        f"Command: `python benchmarks/fp8_cache.py --budgets {args.budgets} --calib-samples "
        f"{args.calib_samples} --eval-tokens {args.eval_tokens} --ctx {args.ctx} --method "
        f"{args.method}` ({time.strftime('%Y-%m-%d')}, 2 CPU cores, "
        f"{time.time() - started:.0f} s).",
        "",
        f"Tragedies, {tokens} tokens in windows of {args.ctx}, fp32 model, fp8 cache simulated "
        f"as vLLM's decode reads it (docs/fp8_cache.md). Source PPL **{ppl_src:.3f}**. "
        "Converted with `--method "
        f"{method}`" + (f" `--freqfold {fold}`" if fold else "") + ". The served sizes pad "
        "with zeros, which fp8 stores exactly, so e.g. 576 on FLASHMLA scores as its row here.",
        "",
        "| KV elements | rope + latent | PPL bf16/fp32 cache | fp8, query e4m3 (FLASHMLA, "
        "FLASHINFER_MLA) | fp8, query unquantized (TRITON_MLA) | fp8 query e4m3, our scales "
        "taken out |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['budget']} | {r['rope']} + {r['rank']} | {r['auto']:.3f} | {r['fp8']:.3f} "
            f"({pct(r['fp8'], r['auto'])}) | {r['fp8_triton']:.3f} "
            f"({pct(r['fp8_triton'], r['auto'])}) | {r['fp8_unscaled']:.3f} "
            f"({pct(r['fp8_unscaled'], r['auto'])}) |"
        )
    worst = max(max(r["fp8"], r["fp8_triton"]) / r["auto"] - 1 for r in rows)
    lines += [
        "",
        f"Largest fp8 increase over the unquantized cache: {100 * worst:+.2f}%.",
        "",
        f"Per layer at {rows[0]['budget']} elements, over {args.range_windows} windows (e4m3: "
        "largest finite 448, subnormal below 2^-6 = 0.0156); with our scales, and (in brackets) "
        "as the checkpoint would cache without them:",
        "",
        "| layer | max latent | latent p99.9 | max / p99.9 | latent < 2^-6 | max rope key | "
        "max absorbed query |",
        "|---|---|---|---|---|---|---|",
    ]
    first = layer_ranges[rows[0]["budget"]]
    for s, u in zip(first["scaled"], first["unscaled"], strict=True):
        lines.append(
            f"| {s['layer']} | {s['latent_max']:.2f} ({u['latent_max']:.2f}) | "
            f"{s['latent_p999']:.2f} ({u['latent_p999']:.2f}) | "
            f"{s['latent_max'] / s['latent_p999']:.1f} | "
            f"{100 * s['latent_subnormal']:.1f}% ({100 * u['latent_subnormal']:.1f}%) | "
            f"{s['rope_key_max']:.2f} ({u['rope_key_max']:.2f}) | "
            f"{s['query_max']:.2f} ({u['query_max']:.2f}) |"
        )
    saturating = [
        (b, r["layer"])
        for b, v in layer_ranges.items()
        for r in v["unscaled"]
        if max(r["latent_max"], r["rope_key_max"], r["query_max"]) > 448
    ]
    lines += [
        "",
        "Values past 448 (saturated) without our scales, at any budget: "
        + (", ".join(f"{b} elements layer {i}" for b, i in saturating) or "none")
        + ".",
    ]
    publish("fp8_cache", lines, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
