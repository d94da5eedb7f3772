"""The convert command (the default one): ``python -m converter --src SRC --dst DST [options]``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from converter import __version__
from converter.calibration.chunks import HELD_OUT_SHARE
from converter.commands import COMMANDS, setup_logging
from converter.commands.errors import run_command
from converter.commands.options import add_debug_option, add_text_options, default, options_from
from converter.conversion.methods import METHODS
from converter.conversion.options import ConvertOptions
from converter.errors import ConversionError, signals_as_interrupts
from converter.heal.options import TRAIN_CHOICES, HealOptions

DESCRIPTION = """\
Convert a LLaMA / Qwen2 / Mistral checkpoint (grouped-query attention) into Multi-head Latent
Attention in the DeepSeek layout, served by vLLM through the transmla_vllm plugin and loadable
in transformers with trust_remote_code=True.

The KV cache shrinks from 2 * kv_heads * head_dim to kv_lora_rank + rope_dim elements per token
and layer. Calibration text steers the rotations and the latent basis."""

EPILOG = (
    "other commands (python -m converter COMMAND --help):\n"
    + "".join(f"  {name:<9} {what}\n" for name, what in COMMANDS.items())
    + """
examples:
  python -m converter --src ./SmolLM2-135M-Instruct --dst ./smollm2-mla --calib-text book.txt
  python -m converter --src meta-llama/Llama-3.1-8B-Instruct --dst ./llama-mla \\
      --calib-text ./my-corpus/ --kv-lora-rank 448 --rope-dim 64
"""
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m converter",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--src", required=True, help="source model folder, or a Hugging Face Hub id (owner/name)"
    )
    p.add_argument("--dst", required=True, help="output folder (must be absent or empty)")
    size = p.add_argument_group("sizes (KV cache per token per layer = kv_lora_rank + rope_dim)")
    size.add_argument(
        "--rope-dim",
        type=int,
        default=option("rope_dim"),
        help="dims of the shared rope key r (default 64, or head_dim if smaller)",
    )
    size.add_argument(
        "--kv-lora-rank",
        type=int,
        default=option("kv_lora_rank"),
        help="latent rank rho (default 512; clipped to 2*kv_heads*head_dim - r)",
    )
    size.add_argument(
        "--kv-budget",
        type=float,
        default=option("kv_budget"),
        help="fraction of the source's KV elements to keep; picks r and rho",
    )
    size.add_argument(
        "--kv-elements",
        type=int,
        default=option("kv_elements"),
        help="KV elements per token per layer to keep; picks r and rho",
    )
    size.add_argument(
        "--target",
        choices=["vllm", "hf"],
        default=option("target"),
        help="vllm (default): only shapes vLLM serves as MLA on a GPU (rope 64 or a "
        "divisor of it, latent <= 512; others are refused with what would serve them), and "
        "a budget rounded down to a size served unpadded (320/512/576); hf: any size, for "
        "transformers",
    )
    size.add_argument(
        "--freqfold",
        default=option("freqfold"),
        help="frequencies pooled per rope PCA: an integer, or 'auto' (default) to pick the "
        f"best per layer on held-out calibration chunks ({HELD_OUT_SHARE} of them)",
    )
    p.add_argument(
        "--method",
        choices=sorted(METHODS),
        default=option("method"),
        help="conversion method (default %(default)s); 'transmla' is the published method. "
        + "; ".join(f"{m.name}: {m.description}" for m in METHODS.values()),
    )
    cal = add_text_options(
        p, "calibration (default: the small set bundled with the package)", "calibrate on"
    )
    cal.add_argument(
        "--calib-samples",
        type=int,
        default=option("calib_samples"),
        help="chunks (default %(default)s)",
    )
    cal.add_argument(
        "--calib-seqlen",
        type=int,
        default=option("calib_seqlen"),
        help="tokens per chunk (default %(default)s)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=option("dtype"),
        help="output dtype (default: the source's)",
    )
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default=option("device"),
        help="where calibration runs (default auto: cuda when available)",
    )
    p.add_argument(
        "--max-shard-size",
        default=option("max_shard_size"),
        help="largest safetensors shard, e.g. 5GB or 500MB (default %(default)s)",
    )
    p.add_argument(
        "--revision", default=option("revision"), help="hub revision when --src is a hub id"
    )
    p.add_argument(
        "--push-to-hub",
        metavar="USER/NAME",
        default=None,
        help="upload the converted folder to this Hub repo when done (uses HF_TOKEN "
        "or your saved login; see `python -m converter upload --help`)",
    )
    p.add_argument("--private", action="store_true", help="with --push-to-hub: private repo")
    p.add_argument(
        "--base-model",
        metavar="OWNER/NAME",
        default=option("base_model"),
        help="Hub id of the source, recorded in config.json and the card's "
        "base_model so the Hub links the conversion to it (automatic when "
        "--src is a Hub id; needed for a local folder)",
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
        help="build the output in .DST.resume next to --dst and keep it if the run "
        "stops (Ctrl-C, kill, crash); the same command with --resume then "
        "continues from the last finished layer. Costs one write of the "
        "calibration states per layer",
    )
    heal = p.add_argument_group("heal (python -m converter heal --help)")
    heal.add_argument(
        "--heal-tokens",
        type=int,
        default=None,
        help="after converting, distil the source into the result on this many tokens of the "
        "calibration text (the unhealed conversion is not kept)",
    )
    heal.add_argument(
        "--heal-train",
        choices=TRAIN_CHOICES,
        default=default(HealOptions, "train"),
        help="weights the heal trains (default %(default)s; heal's --train)",
    )
    heal.add_argument(
        "--teacher-text",
        type=int,
        metavar="N",
        default=default(HealOptions, "teacher_text"),
        help="with --heal-tokens: the teacher writes N tokens with vLLM first and the heal trains "
        "on them (alone when no --calib-* text is given; heal's --teacher-text)",
    )
    add_debug_option(p)
    p.add_argument("--version", action="version", version=f"transmla-vllm {__version__}")
    return p


def option(name: str):
    """The default of ConvertOptions field ``name``: the default of its flag."""
    return default(ConvertOptions, name)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.debug)
    return run_command(
        _convert,
        args,
        output=args.dst,
        memory_hint="lower --calib-samples / --calib-seqlen or use a machine with more RAM",
    )


def _convert(args: argparse.Namespace) -> None:
    opts = options_from(ConvertOptions, args, freqfold=_freqfold(args.freqfold))
    # everything visible from the flags is checked before any model file is read
    _preflight(args)
    if args.push_to_hub:  # fail before hours of work, not after: token and name first
        from converter.hub.upload import check_repo_id, resolve_token

        check_repo_id(args.push_to_hub)
        resolve_token()
    if args.heal_tokens is not None:
        from converter.heal import convert_and_heal

        dst = convert_and_heal(
            opts, tokens=args.heal_tokens, train=args.heal_train, teacher_text=args.teacher_text
        )
    else:
        from converter.conversion.pipeline import convert

        dst = convert(opts)
    if args.push_to_hub:
        _push(dst, args)


def _freqfold(value: str | None) -> int | str | None:
    """--freqfold: an integer, 'auto' or absent (None, the same as 'auto')."""
    if value in (None, "auto"):
        return value
    try:
        return int(value)
    except ValueError:
        raise ConversionError(f"--freqfold must be an integer or 'auto', not {value!r}") from None


def _push(dst: Path, args: argparse.Namespace) -> None:
    """Upload the finished --dst; an interrupt from here on leaves it complete (and says so)."""
    from converter.hub.upload import push_folder

    try:
        with signals_as_interrupts():
            url = push_folder(dst, args.push_to_hub, private=args.private)
    except KeyboardInterrupt as exc:
        exc.committed = True  # --dst was complete before the upload began
        raise
    logging.getLogger("converter").info("uploaded to %s", url)


def _preflight(args: argparse.Namespace) -> None:
    """Refuse flags that cannot work before the source is even opened."""
    from converter.checkpoint.writer import check_destination, parse_size
    from converter.conversion.settings import check_calibration_sizes

    check_calibration_sizes(args.calib_samples, args.calib_seqlen)
    parse_size(args.max_shard_size)
    if args.heal_tokens is not None and args.heal_tokens < 1:
        raise ConversionError(f"--heal-tokens {args.heal_tokens} must be at least 1")
    if args.teacher_text is not None:
        if args.heal_tokens is None:
            raise ConversionError("--teacher-text needs --heal-tokens M (the heal it feeds)")
        from converter.heal.options import TEACHER_TEMPERATURE, TEACHER_TOP_P
        from converter.heal.teacher_text import check_teacher_text_options

        check_teacher_text_options(args.teacher_text, None, TEACHER_TEMPERATURE, TEACHER_TOP_P)
    if args.base_model is not None:
        from converter.hub.ids import check_base_model

        check_base_model(args.base_model)
    check_destination(Path(args.dst), args.overwrite, src=args.src)
