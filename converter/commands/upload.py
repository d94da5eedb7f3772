"""``python -m converter upload DST --repo-id OWNER/NAME``: publish a converted folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from converter.commands import setup_logging
from converter.commands.errors import run_command
from converter.commands.options import add_debug_option
from converter.errors import ConversionError

DESCRIPTION = """\
Check a converted folder (config, every tensor the config implies, shards named by the index,
tokenizer, model card metadata, remote code), then create the Hub repo and upload the folder
with huggingface_hub. Nothing is sent when a check fails; every problem is listed.

Token: --token, else HF_TOKEN, else the saved `hf auth login`. Endpoint: HF_ENDPOINT (default
https://huggingface.co)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m converter upload",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dst", metavar="DST", help="converted folder (the converter's --dst)")
    p.add_argument("--repo-id", required=True, help="Hub model repo, OWNER/NAME")
    p.add_argument(
        "--private",
        action="store_true",
        help="create the repo private (ignored when it already exists)",
    )
    p.add_argument(
        "--revision",
        default=None,
        help="branch to commit to (created from main when absent; default main)",
    )
    p.add_argument(
        "--token",
        default=None,
        help="Hub token with write access (default: HF_TOKEN or the saved login); "
        "prefer HF_TOKEN, a flag is visible in the process list",
    )
    p.add_argument(
        "--exist-ok",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="upload into an existing repo (default); --no-exist-ok refuses",
    )
    p.add_argument(
        "--base-model",
        metavar="OWNER/NAME",
        default=None,
        help="Hub id of the source model, written into the uploaded card's "
        "base_model so the Hub links the conversion to it (needed when the "
        "folder was converted from a local --src)",
    )
    add_debug_option(p)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.debug)
    return run_command(_upload, args)


def _upload(args: argparse.Namespace) -> None:
    folder = Path(args.dst)
    if not folder.is_dir():
        raise ConversionError(f"{folder} is not a folder; pass the converter's --dst")
    from converter.hub.upload import push_folder

    url = push_folder(
        folder,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        token=args.token,
        exist_ok=args.exist_ok,
        base_model=args.base_model,
    )
    print(url)
