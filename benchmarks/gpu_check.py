"""CUDA vs CPU conversion check, in one go on a machine with a GPU:

    python benchmarks/gpu_check.py [--layers 4] [--method sequential-refit]

Builds a small random LLaMA checkpoint with Llama-3-8B attention geometry (32 heads, 8 KV heads,
head_dim 128; fewer layers and a narrow MLP so it runs in a minute), converts it with
``--device cpu`` and ``--device cuda`` (same settings, fp32 output), and prints a short table:
the largest relative difference per tensor kind and the wall time of each run. The two results
must agree within fp32 tolerance. Eigendecompositions on different devices may return different
signs and orderings of near-equal eigenvalues, so the check compares what the two converted
models compute: their logits on the same tokens (relative difference <= 1e-3).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--method", default="sequential-refit")
    p.add_argument("--tolerance", type=float, default=1e-3)
    args = p.parse_args()

    import torch
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to compare")
        return 2
    from benchmarks.convert_scaling import SHAPE, make_checkpoint

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    shape = dict(SHAPE)
    SHAPE["intermediate_size"] = 2048  # narrow MLP: the check is about attention math
    src = work / "src"
    make_checkpoint(src, args.layers)
    SHAPE.update(shape)
    runs = {}
    for device in ("cpu", "cuda"):
        dst = work / device
        started = time.time()
        subprocess.run([sys.executable, "-m", "converter", "--src", str(src), "--dst", str(dst),
                        "--device", device, "--dtype", "float32", "--method", args.method,
                        "--calib-samples", "16", "--kv-lora-rank", "448", "--rope-dim", "64"],
                       check=True)
        runs[device] = time.time() - started
    # compare what the models compute (eigenvector signs and orderings may differ by device)
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 8000, (2, 128), generator=torch.Generator().manual_seed(0))
    logits = {}
    for device in ("cpu", "cuda"):
        model = AutoModelForCausalLM.from_pretrained(work / device, dtype=torch.float32,
                                                     trust_remote_code=True)
        with torch.no_grad():
            logits[device] = model(ids).logits
    err = float((logits["cpu"] - logits["cuda"]).norm() / logits["cpu"].norm())
    agree = float((logits["cpu"].argmax(-1) == logits["cuda"].argmax(-1)).float().mean())
    print("\n| check | value |\n|---|---|")
    print(f"| logits relative difference, cuda vs cpu conversion | {err:.2e} |")
    print(f"| top-1 agreement | {100 * agree:.2f}% |")
    print(f"| wall time cpu / cuda | {runs['cpu']:.1f} s / {runs['cuda']:.1f} s |")
    ok = err <= args.tolerance
    print("PASS" if ok else "FAIL", f"(tolerance {args.tolerance})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
