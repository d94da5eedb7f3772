"""``python -m converter heal --teacher SRC --student CONVERTED --dst OUT --tokens N``:
distil the source model into its converted checkpoint (KL of next-token laws on real text),
keeping the best held-out perplexity; the output has the same format as the input."""

from __future__ import annotations

import argparse
import logging

from converter.commands import setup_logging
from converter.commands.errors import run_command
from converter.commands.options import add_debug_option, add_text_options, default, options_from
from converter.heal.options import EVALUATIONS, PRECISIONS, TRAIN_CHOICES, HealOptions

EPILOG = """\
examples:
  python -m converter heal --teacher ./SmolLM2-135M-Instruct --student ./smollm2-mla \\
      --dst ./smollm2-mla-healed --tokens 200000 --calib-text ./book.txt
  python -m converter --src ./SmolLM2-135M-Instruct --dst ./smollm2-mla --heal-tokens 200000
"""


def option(name: str):
    """The default of HealOptions field ``name``: the default of its flag."""
    return default(HealOptions, name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m converter heal",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--teacher", required=True, help="the source model (folder or hub id)")
    p.add_argument("--student", required=True, help="its converted folder")
    p.add_argument("--dst", required=True, help="output folder (must be absent or empty)")
    p.add_argument(
        "--tokens",
        type=int,
        required=True,
        help="training tokens (several passes over the text when it holds fewer)",
    )
    p.add_argument(
        "--seqlen", type=int, default=option("seqlen"), help="tokens per sequence (%(default)s)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=option("batch_size"),
        help="sequences per step (%(default)s)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=option("lr"),
        help="peak AdamW step relative to each trained tensor's RMS (%(default)g); a run whose "
        "training KL blows up goes back to its best weights at half the rate (3 times at most)",
    )
    p.add_argument(
        "--train",
        choices=TRAIN_CHOICES,
        default=option("train"),
        help="weights trained: the attention ones (default; MLP, norms and embeddings frozen) "
        "or all",
    )
    p.add_argument(
        "--hidden-weight",
        type=float,
        default=option("hidden_weight"),
        help="add this weight times the relative squared error of the final hidden states to "
        "the KL loss (0: KL only)",
    )
    add_text_options(p, "text (default: the small set bundled with the package)", "train on")
    ev = p.add_argument_group(
        "held-out text: validation rows choose the kept step, test rows give the reported "
        "figure (measured on the weights as written) and choose nothing"
    )
    ev.add_argument(
        "--eval-text",
        default=option("eval_text"),
        help="text to hold out instead of the end of the training text: its first rows are the "
        "test rows, the next ones the validation rows",
    )
    ev.add_argument(
        "--eval-tokens",
        type=int,
        default=option("eval_tokens"),
        help="tokens in each of the validation and test slices (%(default)s)",
    )
    ev.add_argument(
        "--eval-every",
        type=int,
        default=option("eval_every"),
        help=f"training tokens between validation evaluations (default: {EVALUATIONS} over the "
        "run)",
    )
    ev.add_argument(
        "--keep-worse",
        action="store_true",
        default=option("keep_worse"),
        help="write the healed weights even when they measure worse than the input on the test "
        "rows (default: write the input's weights and say so)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=option("device"))
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=option("precision"),
        help="matmuls of the training steps: bf16 autocast (weights stay as loaded) or fp32; "
        "auto: bf16 on a GPU and on a CPU with AMX tiles, else fp32 (docs/benchmarks.md "
        "heal_step measures both). Held-out figures on a CPU are fp32, and bf16 is used only "
        "where both models' bf16 and fp32 forwards agree (else fp32, with a warning)",
    )
    p.add_argument(
        "--seed", type=int, default=option("seed"), help="order of the training sequences"
    )
    p.add_argument(
        "--max-shard-size",
        default=option("max_shard_size"),
        help="largest safetensors shard (%(default)s)",
    )
    p.add_argument(
        "--revision", default=option("revision"), help="hub revision when --teacher is a hub id"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        default=option("overwrite"),
        help="replace a non-empty --dst",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        default=option("resume"),
        help="keep progress in .DST.resume at every evaluation; the same command with "
        "--resume continues an interrupted run from there",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_debug_option(p)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.debug)
    return run_command(_heal, args, output=args.dst, memory_hint="lower --batch-size or --seqlen")


def _heal(args: argparse.Namespace) -> None:
    import torch

    from converter.heal import heal

    if args.threads:
        torch.set_num_threads(args.threads)
    heal(options_from(HealOptions, args))
    logging.getLogger("converter").info("done")
