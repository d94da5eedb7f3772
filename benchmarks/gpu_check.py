"""CUDA vs CPU conversion check, in one go on a machine with a GPU:

    python benchmarks/gpu_check.py [--layers 4] [--method refit]

Builds a small random LLaMA checkpoint with Llama-3-8B attention geometry (32 heads, 8 KV heads,
head_dim 128, hidden 4096; fewer layers and a narrow MLP so it runs in a minute), converts it
with ``--device cpu`` and ``--device cuda`` (same settings, fp32 output) and prints a short
table: the logits of the two converted models on the same tokens, the per-layer statistics the
two runs logged (rope / latent energy, FreqFold chosen, o_proj refit error) and the wall time of
each run. Eigendecompositions on different devices may return different signs and orderings of
near-equal eigenvalues, so weights are not compared entry by entry: what the models compute is.
Exit status 0 when the logits agree within ``--tolerance`` (relative Frobenius difference).
``--against cpu`` runs the same comparison cpu vs cpu (a dry run for machines without a GPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from transmla_vllm.checkpoint_format import REPORT_FILE

ROOT = Path(__file__).resolve().parent.parent


def convert(src: Path, dst: Path, device: str, method: str, samples: int) -> float:
    started = time.time()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "converter",
            "--src",
            str(src),
            "--dst",
            str(dst),
            "--overwrite",
            "--device",
            device,
            "--dtype",
            "float32",
            "--method",
            method,
            "--calib-samples",
            str(samples),
            "--kv-lora-rank",
            "448",
            "--rope-dim",
            "64",
        ],
        check=True,
        cwd=ROOT,
    )
    return time.time() - started


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--method", default="refit")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--tolerance", type=float, default=1e-3)
    p.add_argument("--against", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--workdir", default=None)
    args = p.parse_args()

    import torch

    if args.against == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to compare (use --against cpu for a dry run)")
        return 2
    from benchmarks.convert_scaling import SHAPE, make_checkpoint

    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-check-"))
    src = work / "src"
    make_checkpoint(src, args.layers, shape={**SHAPE, "intermediate_size": 2048})
    runs, reports, logits = {}, {}, {}
    for label, device in (("cpu", "cpu"), ("other", args.against)):
        dst = work / label
        runs[label] = convert(src, dst, device, args.method, args.calib_samples)
        reports[label] = json.loads((dst / REPORT_FILE).read_text())["layers"]
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 8000, (2, 128), generator=torch.Generator().manual_seed(0))
    for label in runs:
        model = AutoModelForCausalLM.from_pretrained(
            work / label, dtype=torch.float32, trust_remote_code=True
        )
        with torch.no_grad():
            logits[label] = model(ids).logits
    a, b = logits["cpu"], logits["other"]
    err = float((a - b).norm() / a.norm())
    agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())

    def worst(key: str, index: int | None = None) -> float:
        def value(r: dict) -> float:
            return r[key] if index is None else r[key][index]

        return max(
            abs(value(x) - value(y)) for x, y in zip(reports["cpu"], reports["other"], strict=True)
        )

    name = torch.cuda.get_device_name() if args.against == "cuda" else "cpu"
    print(
        f"\ntorch {torch.__version__}, {args.against} = {name}; {args.layers} layers of "
        f"Llama-3-8B attention geometry, method {args.method}, {args.calib_samples} chunks"
    )
    print("\n| check | value |\n|---|---|")
    print(f"| logits relative difference, {args.against} vs cpu conversion | {err:.2e} |")
    print(f"| top-1 agreement | {100 * agree:.2f}% |")
    print(f"| max difference in rope key energy fraction | {worst('rope_key_energy'):.1e} |")
    print(f"| max difference in latent energy fraction | {worst('latent_energy'):.1e} |")
    same_fold = all(
        x["freqfold"] == y["freqfold"]
        for x, y in zip(reports["cpu"], reports["other"], strict=True)
    )
    print(f"| same FreqFold chosen in every layer | {'yes' if same_fold else 'NO'} |")
    if "o_refit_rel_error" in reports["cpu"][0]:
        print(f"| max difference in o_proj refit error | {worst('o_refit_rel_error', 1):.1e} |")
    print(f"| wall time cpu / {args.against} | {runs['cpu']:.1f} s / {runs['other']:.1f} s |")
    ok = err <= args.tolerance and same_fold
    print("PASS" if ok else "FAIL", f"(tolerance {args.tolerance})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
