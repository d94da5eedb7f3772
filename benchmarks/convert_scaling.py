"""Conversion cost vs depth: wall time and peak RSS (whole process, from the OS) of converting
synthetic LLaMA-shaped checkpoints with Llama-3-8B layers (hidden 4096, 32 heads, 8 KV heads,
head_dim 128, intermediate 14336, random bf16 weights) at 2, 4 and 8 layers, same settings.

    python benchmarks/convert_scaling.py          # writes the "convert_scaling" section
    python benchmarks/convert_scaling.py --method refit-recon --layers 2,8
                                                  # "convert_scaling_refit_recon"

Targets: peak RSS at 8 layers <= 1.25x that at 2 layers and below 60% of the source checkpoint;
8-layer time <= 4.5x the 2-layer time. Projections for 32- and 80-layer models use the measured
per-layer cost.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from transmla_testing.report import publish
from transmla_vllm.checkpoint_format import CONFIG_FILE, INDEX_FILE, REPORT_FILE

ROOT = Path(__file__).resolve().parent.parent

SHAPE = dict(
    hidden_size=4096,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=14336,
    vocab_size=32000,
)
# Llama-3.1-70B layers (the vocabulary stays small: embeddings are not what streaming is about)
SHAPE_70B = dict(SHAPE, hidden_size=8192, num_attention_heads=64, intermediate_size=28672)
SHAPES = {"8b": SHAPE, "70b": SHAPE_70B}
LABELS = {"8b": "Llama-3-8B", "70b": "Llama-3.1-70B"}


def make_checkpoint(folder: Path, layers: int, seed: int = 0, shape: dict | None = None) -> int:
    """Random bf16 Llama-3-8B-shaped layers (or ``shape``), one shard per layer (never all in
    memory)."""
    import torch
    from safetensors.torch import save_file

    from converter.calibration.text import BUNDLED
    from converter.sources.inspection import inspect_source
    from converter.sources.tensors import source_layer_tensors, source_tensors
    from transmla_testing.models import make_tokenizer
    from transmla_vllm.checkpoint_format import EMBED, FINAL_NORM, LM_HEAD, layer_prefix

    shape = SHAPE if shape is None else shape
    if (folder / CONFIG_FILE).is_file():
        return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    folder.mkdir(parents=True, exist_ok=True)
    make_tokenizer(
        folder,
        8000,
        texts=[p.read_text() for p in sorted(BUNDLED.glob("*.txt"))],
        chat_template=False,
    )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **shape,
        "num_hidden_layers": layers,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    # names and shapes as the converter expects them from this config (sources/tensors.py)
    spec = inspect_source(config)
    gen = torch.Generator().manual_seed(seed)

    def tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16)
        return (torch.randn(*shape, generator=gen) / shape[-1] ** 0.5).to(torch.bfloat16)

    weight_map: dict[str, str] = {}

    def save(file: str, names: dict[str, tuple[int, ...]]) -> None:
        save_file(
            {n: tensor(n, s) for n, s in names.items()},
            str(folder / file),
            metadata={"format": "pt"},
        )
        weight_map.update({n: file for n in names})

    every = source_tensors(spec)
    save("embed.safetensors", {EMBED: every[EMBED]})
    per_layer = source_layer_tensors(spec)
    for i in range(layers):
        save(f"layer-{i:03d}.safetensors", {layer_prefix(i) + n: s for n, s in per_layer.items()})
    save("head.safetensors", {n: every[n] for n in (FINAL_NORM, LM_HEAD)})
    (folder / INDEX_FILE).write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1)
    )
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def run_conversion(src: Path, dst: Path, extra: list[str]) -> tuple[float, int, dict]:
    """Wall seconds and peak RSS (bytes, from wait4) of one conversion subprocess."""
    cmd = [
        sys.executable,
        "-m",
        "converter",
        "--src",
        str(src),
        "--dst",
        str(dst),
        "--overwrite",
        *extra,
    ]
    print("$", " ".join(cmd[1:]), flush=True)
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.time() - started
    if status != 0:
        raise SystemExit(f"conversion failed ({status}): rerun the command above to see why")
    report = json.loads((dst / REPORT_FILE).read_text())
    return seconds, usage.ru_maxrss * 1024, report


def projection(shape: str, machine: str, fixed: float, per_layer: float, samples: int) -> str:
    """Full-depth estimates from the measured fixed and per-layer cost."""
    note = (
        f" with {samples} calibration chunks (the converter's default is 128; the "
        "calibration passes grow with it)"
    )
    if shape == "8b":
        return (
            f"- Projection ({machine}){note}: a 32-layer 8B model "
            f"~{(fixed + 32 * per_layer) / 60:.1f} min; an 80-layer 70B model "
            f"~{(fixed + 80 * 4 * per_layer) / 60:.0f} min if a 70B layer costs ~4x an 8B "
            "one (measured directly with `--shape 70b`); peak memory does not grow with "
            "depth."
        )
    return (
        f"- Projection ({machine}){note}: an 80-layer 70B model "
        f"~{(fixed + 80 * per_layer) / 60:.0f} min at the measured per-layer cost, in the "
        "peak memory measured here (it does not grow with depth)."
    )


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", default=str(ROOT / ".cache" / "convert_scaling"))
    p.add_argument("--layers", default="2,4,8")
    p.add_argument("--calib-samples", type=int, default=4)
    p.add_argument("--method", default="refit")
    p.add_argument("--keep", action="store_true", help="keep the converted outputs")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    p.add_argument(
        "--section",
        default=None,
        help="docs/benchmarks.md section (default convert_scaling[_cuda], then "
        "_METHOD for a --method other than refit)",
    )
    args = p.parse_args()
    work = Path(args.workdir)
    extra = [
        "--kv-lora-rank",
        "512",
        "--rope-dim",
        "64",
        "--calib-samples",
        str(args.calib_samples),
        "--method",
        args.method,
        "--device",
        args.device,
    ]
    machine = f"{os.cpu_count()} CPU cores"
    if args.device == "cuda":
        import torch

        machine += f", {torch.cuda.get_device_name()}"
    rows = []
    for n in (int(x) for x in args.layers.split(",")):
        src = work / (f"llama3-8b-shape-{n}l" if args.shape == "8b" else f"{args.shape}-{n}l")
        size = make_checkpoint(src, n, shape=SHAPES[args.shape])
        dst = work / f"out-{n}l"
        seconds, rss, _ = run_conversion(src, dst, extra)
        if not args.keep:
            shutil.rmtree(dst, ignore_errors=True)
        rows.append(
            {"layers": n, "source_gb": size / 1e9, "seconds": seconds, "peak_rss_gb": rss / 1e9}
        )
        print(
            f"{n} layers: {seconds:.1f} s, peak RSS {rss / 1e9:.2f} GB, source {size / 1e9:.2f} GB",
            flush=True,
        )
    first, last = rows[0], rows[-1]
    per_layer = (last["seconds"] - first["seconds"]) / (last["layers"] - first["layers"])
    fixed = first["seconds"] - per_layer * first["layers"]
    lines = [
        f"## Conversion cost vs depth ({LABELS[args.shape]} layer shape, {args.device}, "
        f"{args.method})",
        "",
        f"Command: `python benchmarks/convert_scaling.py --layers {args.layers} --calib-samples "
        f"{args.calib_samples} --method {args.method} --device {args.device} --shape "
        f"{args.shape}` "
        f"({time.strftime('%Y-%m-%d')}, {machine}). Converter flags: `"
        + " ".join(extra)
        + "`; calibration: the bundled set.",
        "",
        "| layers | source GB | wall s | peak RSS GB | RSS / source |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layers']} | {r['source_gb']:.2f} | {r['seconds']:.1f} | "
            f"{r['peak_rss_gb']:.2f} | {r['peak_rss_gb'] / r['source_gb']:.2f} |"
        )
    rss_ratio = last["peak_rss_gb"] / first["peak_rss_gb"]
    small = last["peak_rss_gb"] < 0.6 * last["source_gb"]
    time_ratio = last["seconds"] / first["seconds"]
    if args.shape == "8b":
        share = 100 * last["peak_rss_gb"] / last["source_gb"]
        size_line = (
            f"at {last['layers']} layers {share:.0f}% of the source (target < 60%): "
            f"{'met' if small else 'NOT met'}."
        )
    else:  # a few 70B layers are smaller than the fixed part: compare with the whole model
        layer_gb = (last["source_gb"] - first["source_gb"]) / (last["layers"] - first["layers"])
        full_gb = first["source_gb"] + (80 - first["layers"]) * layer_gb
        size_line = (
            f"an 80-layer model of these layers is {full_gb:.0f} GB (vocabulary "
            f"{SHAPES[args.shape]['vocab_size']}), so the peak is "
            f"{100 * last['peak_rss_gb'] / full_gb:.1f}% of it."
        )
    lines += [
        "",
        f"- Peak RSS {last['layers']} vs {first['layers']} layers: {rss_ratio:.2f}x "
        f"(target <= 1.25x): {'met' if rss_ratio <= 1.25 else 'NOT met'}; {size_line}",
        f"- Time {last['layers']} vs {first['layers']} layers: {time_ratio:.2f}x (target <= "
        f"4.5x): {'met' if time_ratio <= 4.5 else 'NOT met'}. Marginal cost {per_layer:.1f} s "
        f"per layer, fixed cost {fixed:.1f} s.",
        projection(args.shape, machine, fixed, per_layer, args.calib_samples),
    ]
    section = args.section or (
        "convert_scaling"
        + ("" if args.device == "cpu" else f"_{args.device}")
        + ("" if args.method == "refit" else f"_{args.method.replace('-', '_')}")
    )
    publish(section, lines, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
