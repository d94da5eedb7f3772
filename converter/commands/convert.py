"""The convert command (the default one): ``python -m converter --src SRC --dst DST [options]``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from converter import __version__
from converter.commands import setup_logging
from converter.conversion.methods import DEFAULT_METHOD, METHODS
from converter.errors import ConversionError, signals_as_interrupts
from converter.heal.defaults import TRAIN_CHOICES

DESCRIPTION = """\
Convert a LLaMA / Qwen2 / Mistral checkpoint (grouped-query attention) into Multi-head Latent
Attention in the DeepSeek layout, served by vLLM through the transmla_vllm plugin and loadable
in transformers with trust_remote_code=True.

The KV cache shrinks from 2 * kv_heads * head_dim to kv_lora_rank + rope_dim elements per token
and layer. Calibration text steers the rotations and the latent basis."""

EPILOG = """\
other commands (python -m converter COMMAND --help):
  upload    publish a converted folder to the Hugging Face Hub
  inspect   KV cache sizes and capacity of a source or converted folder
  eval      perplexity of a model folder on a text file
  verify    compare a converted folder with its source
  heal      distil the source into a converted folder (or --heal-tokens here)

examples:
  python -m converter --src ./SmolLM2-135M-Instruct --dst ./smollm2-mla --calib-text book.txt
  python -m converter --src meta-llama/Llama-3.1-8B-Instruct --dst ./llama-mla \\
      --calib-text ./my-corpus/ --kv-lora-rank 448 --rope-dim 64
"""


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
        default=None,
        help="dims of the shared rope key r (default 64, or head_dim if smaller)",
    )
    size.add_argument(
        "--kv-lora-rank",
        type=int,
        default=None,
        help="latent rank rho (default 512; clipped to 2*kv_heads*head_dim - r)",
    )
    size.add_argument(
        "--kv-budget",
        type=float,
        default=None,
        help="fraction of the source's KV elements to keep; picks r and rho",
    )
    size.add_argument(
        "--kv-elements",
        type=int,
        default=None,
        help="KV elements per token per layer to keep; picks r and rho",
    )
    size.add_argument(
        "--target",
        choices=["vllm", "hf"],
        default="vllm",
        help="vllm (default): only shapes vLLM serves as MLA on a GPU (rope 64 or a "
        "divisor of it, latent <= 512; others are refused with what would serve them), and "
        "a budget rounded down to a size served unpadded (320/512/576); hf: any size, for "
        "transformers",
    )
    size.add_argument(
        "--freqfold",
        default=None,
        help="frequencies pooled per rope PCA: an integer, or 'auto' (default) "
        "to pick the best per layer on held-out calibration chunks",
    )
    p.add_argument(
        "--method",
        choices=sorted(METHODS),
        default=DEFAULT_METHOD,
        help=f"conversion method (default {DEFAULT_METHOD}); 'transmla' is the "
        "published method. " + "; ".join(f"{m.name}: {m.description}" for m in METHODS.values()),
    )
    cal = p.add_argument_group("calibration (default: the small set bundled with the package)")
    cal.add_argument(
        "--calib-text",
        default=None,
        help="UTF-8 text file, or a folder of .txt/.md files, to calibrate on",
    )
    cal.add_argument("--calib-jsonl", default=None, help="JSON-lines file of documents")
    cal.add_argument(
        "--calib-field",
        default="text",
        help="field of --calib-jsonl / column of --calib-dataset (default text)",
    )
    cal.add_argument(
        "--calib-dataset",
        default=None,
        help="hub dataset NAME[:split] loaded with `datasets` (needs hub access)",
    )
    cal.add_argument(
        "--calib-chat",
        action="store_true",
        help="render calibration text as chat turns with the model's template",
    )
    cal.add_argument("--calib-samples", type=int, default=128, help="chunks (default 128)")
    cal.add_argument("--calib-seqlen", type=int, default=256, help="tokens per chunk (default 256)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="output dtype (default: the source's)",
    )
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where calibration runs (default: cuda when available)",
    )
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest safetensors shard, e.g. 5GB or 500MB (default 5GB)",
    )
    p.add_argument("--revision", default=None, help="hub revision when --src is a hub id")
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
        default=None,
        help="Hub id of the source, recorded in config.json and the card's "
        "base_model so the Hub links the conversion to it (automatic when "
        "--src is a Hub id; needed for a local folder)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst")
    p.add_argument(
        "--resume",
        action="store_true",
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
        default="attention",
        help="weights the heal trains (default attention)",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("--version", action="version", version=f"transmla-vllm {__version__}")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.debug)
    from converter.conversion.pipeline import ConvertOptions, convert

    freqfold = args.freqfold
    if freqfold not in (None, "auto"):
        try:
            freqfold = int(freqfold)
        except ValueError:
            print(
                f"error: --freqfold must be an integer or 'auto', not {freqfold!r}", file=sys.stderr
            )
            return 2
    opts = ConvertOptions(
        src=args.src,
        dst=args.dst,
        rope_dim=args.rope_dim,
        kv_lora_rank=args.kv_lora_rank,
        freqfold=freqfold,
        kv_budget=args.kv_budget,
        kv_elements=args.kv_elements,
        target=args.target,
        calib_text=args.calib_text,
        calib_jsonl=args.calib_jsonl,
        calib_field=args.calib_field,
        calib_dataset=args.calib_dataset,
        calib_chat=args.calib_chat,
        calib_samples=args.calib_samples,
        calib_seqlen=args.calib_seqlen,
        dtype=args.dtype,
        device=args.device,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        revision=args.revision,
        method=args.method,
        resume=args.resume,
        base_model=args.base_model,
    )
    dst = None
    try:
        with signals_as_interrupts():
            # everything visible from the flags is checked before any model file is read
            _preflight(args)
            if args.push_to_hub:  # fail before hours of work, not after: token and name first
                from converter.hub.upload import check_repo_id, resolve_token

                check_repo_id(args.push_to_hub)
                resolve_token()
            if args.heal_tokens is not None:
                from converter.heal import convert_and_heal

                dst = convert_and_heal(opts, args.heal_tokens, args.heal_train)
            else:
                dst = convert(opts)
            if args.push_to_hub:
                from converter.hub.upload import push_folder

                url = push_folder(dst, args.push_to_hub, private=args.private)
                logging.getLogger("converter").info("uploaded to %s", url)
    except ConversionError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM, SIGHUP
        signum = getattr(exc, "signum", signal.SIGINT)
        if dst is not None or getattr(exc, "committed", False):
            print(
                f"interrupted ({signal.Signals(signum).name}) after {args.dst} was complete; "
                "it is kept",
                file=sys.stderr,
            )
        elif args.resume:
            from converter.checkpoint.resume import resume_folder

            print(
                f"interrupted ({signal.Signals(signum).name}): progress kept in "
                f"{resume_folder(Path(args.dst))}; rerun the same command (with --resume) to "
                "continue",
                file=sys.stderr,
            )
        else:
            print(
                f"interrupted ({signal.Signals(signum).name}): nothing was written to --dst "
                "(partial output removed)",
                file=sys.stderr,
            )
        return 128 + signum
    except OSError as exc:
        if args.debug:
            raise
        from converter.errors import describe_os_error

        print(f"error: {describe_os_error(exc, args.dst)}", file=sys.stderr)
        return 1
    except MemoryError:
        if args.debug:
            raise
        print(
            "error: out of memory; lower --calib-samples / --calib-seqlen or use a machine "
            "with more RAM",
            file=sys.stderr,
        )
        return 1
    except Exception as exc:  # a bug: one line, and how to get the traceback
        if args.debug:
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(
            f"error: unexpected {type(exc).__name__}: {first}; rerun with --debug for the "
            "traceback and report it",
            file=sys.stderr,
        )
        return 1
    return 0


def _preflight(args: argparse.Namespace) -> None:
    """Refuse flags that cannot work before the source is even opened."""
    from converter.checkpoint.writer import check_destination, parse_size
    from converter.conversion.settings import check_calibration_sizes

    check_calibration_sizes(args.calib_samples, args.calib_seqlen)
    parse_size(args.max_shard_size)
    if args.heal_tokens is not None and args.heal_tokens < 1:
        raise ConversionError(f"--heal-tokens {args.heal_tokens} must be at least 1")
    if args.base_model is not None:
        from converter.hub.ids import check_base_model

        check_base_model(args.base_model)
    check_destination(Path(args.dst), args.overwrite, src=args.src)
