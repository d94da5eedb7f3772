"""Command line: ``python -m converter --src SRC --dst DST [options]``."""

from __future__ import annotations

import argparse
import logging
import sys

from converter import __version__
from converter.errors import ConversionError

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

examples:
  python -m converter --src ./SmolLM2-135M-Instruct --dst ./smollm2-mla --calib-text book.txt
  python -m converter --src meta-llama/Llama-3.1-8B-Instruct --dst ./llama-mla \\
      --calib-text ./my-corpus/ --kv-lora-rank 448 --rope-dim 64
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m converter", description=DESCRIPTION,
                                epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True,
                   help="source model folder, or a Hugging Face Hub id (owner/name)")
    p.add_argument("--dst", required=True, help="output folder (must be absent or empty)")
    p.add_argument("--rope-dim", type=int, default=None,
                   help="dims of the shared rope key r (default 64, or head_dim if smaller)")
    p.add_argument("--kv-lora-rank", type=int, default=512,
                   help="latent rank rho (default 512; clipped to 2*kv_heads*head_dim - r)")
    p.add_argument("--freqfold", type=int, default=None,
                   help="frequencies pooled per rope PCA (default: smallest valid value)")
    p.add_argument("--calib-text", default=None,
                   help="UTF-8 text file, or a folder of .txt/.md files, to calibrate on")
    p.add_argument("--calib-samples", type=int, default=128, help="chunks (default 128)")
    p.add_argument("--calib-seqlen", type=int, default=256, help="tokens per chunk (default 256)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="output dtype (default: the source's)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where calibration runs (default: cuda when available)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors shard, e.g. 5GB or 500MB (default 5GB)")
    p.add_argument("--revision", default=None, help="hub revision when --src is a hub id")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("--version", action="version", version=f"transmla-vllm {__version__}")
    return p


def run_subcommand(name: str, argv: list[str]) -> int:
    import importlib

    module = importlib.import_module(f"converter.commands.{name}")
    try:
        return module.main(argv)
    except ConversionError as exc:
        if "--debug" in argv:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    from converter.commands import COMMANDS

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        return run_subcommand(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from converter.pipeline import ConvertOptions, convert

    opts = ConvertOptions(
        src=args.src, dst=args.dst, rope_dim=args.rope_dim, kv_lora_rank=args.kv_lora_rank,
        freqfold=args.freqfold, calib_text=args.calib_text, calib_samples=args.calib_samples,
        calib_seqlen=args.calib_seqlen, dtype=args.dtype, device=args.device,
        max_shard_size=args.max_shard_size, overwrite=args.overwrite, revision=args.revision)
    try:
        convert(opts)
    except ConversionError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written to --dst", file=sys.stderr)
        return 130
    return 0
