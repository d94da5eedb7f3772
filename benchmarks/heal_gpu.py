"""Heal on one GPU for the Llama-3.1-8B recipe: memory and speed (torch only, no vLLM).

Builds a Llama-3.1-8B-shaped teacher and its MLA student (rope 64 + latent 512, the default
conversion) in GPU memory with random weights -- heal's memory and speed do not depend on the
values, and nothing has to be downloaded -- then runs the real loop (converter.heal.trainer:
bf16 autocast, trained attention weights in fp32 with AdamW, gradient checkpointing, chunked
KL) for a few steps, and prints the peak GPU memory (torch.cuda.max_memory_allocated) next to
converter.heal.memory's estimate, and tokens per second. The student's kept tensors (MLP,
norms, embeddings, head) are copied from the teacher, as a conversion keeps them, and heal
holds them once (converter/heal/shared.py) unless --no-share.

    python benchmarks/heal_gpu.py                          # GPU: 8B, 2 x 2048 tokens per step
    python benchmarks/heal_gpu.py --estimate-only          # the estimates, with and without
                                                           # sharing; no GPU needed
    python benchmarks/heal_gpu.py --ranks-table            # 8B and 70B per GPU at 1/2/4/8 ranks
                                                           # (writes docs/heal.md "heal_ranks")
    python benchmarks/heal_gpu.py --no-share               # the student keeps its own copies
    python benchmarks/heal_gpu.py --tiny --device cpu      # dry run of the whole script on CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

DOCS_HEAL = Path(__file__).resolve().parent.parent / "docs" / "heal.md"

LLAMA_31_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=128256,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)
LLAMA_31_70B = {
    **LLAMA_31_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
}
RANKS = (1, 2, 4, 8)
TINY = {
    **LLAMA_31_8B,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 1024,
}


def configs(shape: dict, rope: int = 64, rank: int = 512):
    """(teacher LlamaConfig, its SourceSpec, student DeepseekV3Config, student layout)."""
    from transformers import DeepseekV3Config, LlamaConfig

    from converter.sources.inspection import inspect_source
    from transmla_vllm.checkpoint_format import CheckpointLayout, MLAShape, build_config

    teacher = LlamaConfig(**shape)
    spec = inspect_source({**teacher.to_dict(), "architectures": ["LlamaForCausalLM"]})
    rank = min(rank, 2 * spec.kv_width - rope)
    layout = CheckpointLayout(
        shape=MLAShape(rank, rope, spec.head_dim, spec.head_dim, spec.hidden_size, spec.num_heads),
        vocab_size=spec.vocab_size,
        intermediate_size=spec.intermediate_size,
        num_layers=spec.num_layers,
        tie_word_embeddings=spec.tie_word_embeddings,
        q_bias=False,
        kv_a_bias=False,
    )
    student = build_config(
        layout=layout,
        rms_norm_eps=spec.rms_norm_eps,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters=spec.rope_parameters,
        dtype="bfloat16",
        token_ids={},
        provenance={},
    )
    return (
        teacher,
        spec,
        DeepseekV3Config(**{k: v for k, v in student.items() if k != "auto_map"}),
        layout,
    )


def ranks_table(batch_size: int, seqlen: int) -> list[str]:
    """docs/heal.md "heal_ranks": what heal's estimate (converter/heal/memory.py) gives per GPU
    for the 8B and 70B recipes at 1 to 8 ranks, as heal runs them: sharing in one process, each
    model sharded on its own under torchrun; the 1-rank --no-share figure beside it."""
    lines = [
        f"Command: `python benchmarks/heal_gpu.py --ranks-table --batch-size {batch_size} "
        f"--seqlen {seqlen}` (computed by converter/heal/memory.py, not measured). Per GPU, "
        f"GB: Llama-3.1 shapes converted with rope 64 + latent 512, bf16, `--train attention`, "
        f"{batch_size} sequences of {seqlen} tokens per rank (a global --batch-size of "
        f"{batch_size} x ranks), gradient "
        "checkpointing on. One rank holds the student's kept tensors once (shared with the "
        "teacher); under torchrun each model's decoder layers are sharded on their own (no "
        "sharing) and the embeddings, final norm and head stay whole on every rank.",
        "",
        "| model | 1 process, shared | 1 process, `--no-share` | "
        + " | ".join(f"{r} ranks" for r in RANKS[1:])
        + " |",
        "|---|" + "---:|" * (len(RANKS) + 1),
    ]
    for name, shape in (("Llama-3.1-8B", LLAMA_31_8B), ("Llama-3.1-70B", LLAMA_31_70B)):
        _, spec, _, layout = configs(shape)
        settings = [(1, True), (1, False), *((r, False) for r in RANKS[1:])]
        cells = [
            f"{_per_gpu_gb(spec, layout, batch_size, seqlen, ranks, share):.2f}"
            for ranks, share in settings
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _per_gpu_gb(spec, layout, batch_size: int, seqlen: int, ranks: int, share: bool) -> float:
    """Estimated GB on each GPU of an 80 GB card for ``--train attention``."""
    from converter.heal.memory import estimate

    e = estimate(spec, layout, "attention", batch_size, seqlen, "cuda", True, 80e9, share, ranks)
    return e.total / 1e9


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tiny", action="store_true", help="a 2-layer model (dry run)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--train", default="attention", choices=["attention", "all"])
    p.add_argument(
        "--estimate-only",
        action="store_true",
        help="print the estimates with and without sharing and stop",
    )
    p.add_argument(
        "--ranks-table",
        action="store_true",
        help='write the per-GPU estimates at 1/2/4/8 ranks into docs/heal.md ("heal_ranks")',
    )
    p.add_argument(
        "--no-share",
        dest="share",
        action="store_false",
        help="the student keeps its own copy of the tensors equal to the teacher's",
    )
    p.add_argument("--json", default=None, help="also write the result to this file")
    args = p.parse_args()

    from converter.heal.callbacks import standard
    from converter.heal.data import HealData
    from converter.heal.loop import LoopState, TrainSettings
    from converter.heal.memory import estimate, trainable_names
    from converter.heal.objective import held_out
    from converter.heal.shared import share_frozen
    from converter.heal.trainer import Trainer

    if args.ranks_table:
        from transmla_testing.report import publish_in

        publish_in(DOCS_HEAL, "heal_ranks", ranks_table(args.batch_size, args.seqlen))
        return 0
    shape = TINY if args.tiny else LLAMA_31_8B
    teacher_cfg, spec, student_cfg, layout = configs(shape)
    device = args.device
    # the recipe checkpoints (the 8B activations do not fit twice over otherwise)
    sizes = (spec, layout, args.train, args.batch_size, args.seqlen, device)
    estimates = {share: estimate(*sizes, share=share) for share in (True, False)}
    est = estimates[args.share]
    result = {
        "model": "tiny" if args.tiny else "Llama-3.1-8B shape",
        "device": device,
        "batch_size": args.batch_size,
        "seqlen": args.seqlen,
        "train": args.train,
        "share": args.share,
        "estimate_gb": {k: round(v / 1e9, 2) for k, v in est.parts.items()},
        "estimate_total_gb": round(est.total / 1e9, 2),
    }
    if args.estimate_only:
        for share, e in estimates.items():
            label = "with sharing" if share else "without sharing (--no-share)"
            print(f"{label}: {e.describe()}")
        result["estimate_total_gb_by_share"] = {
            "shared": round(estimates[True].total / 1e9, 2),
            "not shared": round(estimates[False].total / 1e9, 2),
            "held once": round(estimates[True].shared / 1e9, 2),
        }
        print(json.dumps(result, indent=1))
        return 0
    print(est.describe(), flush=True)
    from transformers import LlamaForCausalLM

    from converter.heal.models import make_trainable
    from converter.remote_code.modeling_transmla import TransMLAForCausalLM

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    started = time.time()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        teacher = LlamaForCausalLM(teacher_cfg).eval().requires_grad_(False)
        student = TransMLAForCausalLM(student_cfg)
    torch.set_default_dtype(torch.float32)
    make_trainable(student, trainable_names(layout, args.train))
    kept = layout.kept_from_source()
    with torch.no_grad():  # as a conversion leaves them: the source's own values
        for name, source in kept.items():
            student.get_parameter(name).copy_(teacher.get_parameter(source))
    if args.share:
        result["sharing"] = share_frozen(teacher, student, kept).as_report()
    built = time.time() - started
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(spec.vocab_size, (args.steps * args.batch_size, args.seqlen), generator=g)
    data = HealData(rows, rows[: args.batch_size], rows[: args.batch_size])
    precision = "bf16" if device == "cuda" else "fp32"
    cfg = TrainSettings(
        tokens=rows.numel(),
        batch_size=args.batch_size,
        lr=1e-2,
        eval_every=args.steps,
        hidden_weight=0.0,
        device=device,
        precision=precision,
    )
    t0 = time.time()
    held_out(student, data.validation, device, args.batch_size, precision, teacher)
    eval_s = time.time() - t0
    t0 = time.time()
    trainer = Trainer(student, teacher, data, cfg, LoopState(), standard())
    trainer.fit()  # evaluates before and after: 2 x eval_s
    train_s = max(time.time() - t0 - 2 * eval_s, 1e-9)
    result.update(
        build_s=round(built, 1),
        step_s=round(train_s / args.steps, 3),
        tokens_per_s=round(rows.numel() / train_s, 1),
        hours_per_100m_tokens=round(1e8 / (rows.numel() / train_s) / 3600, 2),
    )
    if device == "cuda":
        result.update(
            peak_gpu_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2),
            peak_gpu_reserved_gb=round(torch.cuda.max_memory_reserved() / 1e9, 2),
            gpu=torch.cuda.get_device_name(),
        )
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
