"""``python -m converter heal --teacher SRC --student CONVERTED --dst OUT --tokens N``:
distil the source model into its converted checkpoint (KL of next-token laws on real text),
keeping the best held-out perplexity; the output has the same format as the input."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from converter.commands import setup_logging
from converter.errors import ConversionError, signals_as_interrupts
from converter.heal.defaults import BATCH_SIZE, LR, PRECISIONS, SEQLEN, TRAIN_CHOICES

EPILOG = """\
examples:
  python -m converter heal --teacher ./SmolLM2-135M-Instruct --student ./smollm2-mla \\
      --dst ./smollm2-mla-healed --tokens 200000 --calib-text ./book.txt
  python -m converter --src ./SmolLM2-135M-Instruct --dst ./smollm2-mla --heal-tokens 200000
"""


def add_text_options(p: argparse.ArgumentParser) -> None:
    """The calibration text flags of convert, with the same meaning (heal trains on that text)."""
    cal = p.add_argument_group("text (default: the small set bundled with the package)")
    cal.add_argument("--calib-text", default=None, help="UTF-8 text file or folder to train on")
    cal.add_argument("--calib-jsonl", default=None, help="JSON-lines file of documents")
    cal.add_argument("--calib-field", default="text", help="field / column of the documents")
    cal.add_argument("--calib-dataset", default=None, help="hub dataset NAME[:split]")
    cal.add_argument(
        "--calib-chat", action="store_true", help="render the text as chat turns (instruct models)"
    )


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
    p.add_argument("--seqlen", type=int, default=SEQLEN, help=f"tokens per sequence ({SEQLEN})")
    p.add_argument(
        "--batch-size", type=int, default=BATCH_SIZE, help=f"sequences per step ({BATCH_SIZE})"
    )
    p.add_argument(
        "--lr",
        type=float,
        default=LR,
        help=f"peak AdamW step relative to each trained tensor's RMS ({LR:g}); a run whose "
        "training KL blows up goes back to its best weights at half the rate (3 times at most)",
    )
    p.add_argument(
        "--train",
        choices=TRAIN_CHOICES,
        default="attention",
        help="weights trained: the attention ones (default; MLP, norms and embeddings frozen) "
        "or all",
    )
    p.add_argument(
        "--hidden-weight",
        type=float,
        default=0.0,
        help="add this weight times the relative squared error of the final hidden states to "
        "the KL loss (0: KL only)",
    )
    add_text_options(p)
    ev = p.add_argument_group(
        "held-out text: validation rows choose the kept step, test rows give the reported "
        "figure (measured on the weights as written) and choose nothing"
    )
    ev.add_argument(
        "--eval-text",
        default=None,
        help="text to hold out instead of the end of the training text: its first rows are the "
        "test rows, the next ones the validation rows",
    )
    ev.add_argument(
        "--eval-tokens",
        type=int,
        default=4096,
        help="tokens in each of the validation and test slices (4096)",
    )
    ev.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="training tokens between validation evaluations (default: 8 over the run)",
    )
    ev.add_argument(
        "--keep-worse",
        action="store_true",
        help="write the healed weights even when they measure worse than the input on the test "
        "rows (default: write the input's weights and say so)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="matmuls of the training steps: bf16 autocast (weights stay as loaded) or fp32; "
        "auto: bf16 on a GPU and on a CPU with AMX tiles, else fp32 (docs/benchmarks.md "
        "heal_step measures both). Held-out figures on a CPU are fp32, and bf16 is used only "
        "where both models' bf16 and fp32 forwards agree (else fp32, with a warning)",
    )
    p.add_argument("--seed", type=int, default=0, help="order of the training sequences")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (5GB)")
    p.add_argument("--revision", default=None, help="hub revision when --teacher is a hub id")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep progress in .DST.resume at every evaluation; the same command with "
        "--resume continues an interrupted run from there",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.debug)
    import torch

    from converter.heal import HealOptions, heal

    if args.threads:
        torch.set_num_threads(args.threads)
    opts = HealOptions(
        teacher=args.teacher,
        student=args.student,
        dst=args.dst,
        tokens=args.tokens,
        seqlen=args.seqlen,
        batch_size=args.batch_size,
        lr=args.lr,
        train=args.train,
        hidden_weight=args.hidden_weight,
        eval_text=args.eval_text,
        eval_tokens=args.eval_tokens,
        eval_every=args.eval_every,
        calib_text=args.calib_text,
        calib_jsonl=args.calib_jsonl,
        calib_field=args.calib_field,
        calib_dataset=args.calib_dataset,
        calib_chat=args.calib_chat,
        device=args.device,
        precision=args.precision,
        seed=args.seed,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        resume=args.resume,
        revision=args.revision,
        keep_worse=args.keep_worse,
    )
    try:
        with signals_as_interrupts():
            heal(opts)
    except ConversionError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        name = signal.Signals(signum).name
        if getattr(exc, "committed", False):
            print(
                f"interrupted ({name}) after {args.dst} was complete; it is kept", file=sys.stderr
            )
        elif args.resume:
            from converter.checkpoint.resume import resume_folder

            print(
                f"interrupted ({name}): progress kept in {resume_folder(Path(args.dst))}; rerun "
                "the same command (with --resume) to continue",
                file=sys.stderr,
            )
        else:
            print(f"interrupted ({name}): nothing was written to --dst", file=sys.stderr)
        return 128 + signum
    except MemoryError:
        if args.debug:
            raise
        print("error: out of memory; lower --batch-size or --seqlen", file=sys.stderr)
        return 1
    logging.getLogger("converter").info("done")
    return 0
