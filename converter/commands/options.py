"""Flags more than one command takes, written once, and the bridge between flags and the option
dataclasses (ConvertOptions, HealOptions): a flag's default is the dataclass field's
(``default``), and the dataclass is built from the parsed flags by field name (``options_from``),
so no value or default is copied by hand."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from typing import Any, TypeVar

from converter.calibration.text import TEXT_SUFFIXES, TextOptions

T = TypeVar("T")


def default(options: type, name: str) -> Any:
    """The default of field ``name`` of the dataclass ``options``: the flag's default."""
    for f in fields(options):
        if f.name == name:
            if f.default is MISSING:
                raise TypeError(f"{options.__name__}.{name} has no plain default")
            return f.default
    raise TypeError(f"{options.__name__} has no field {name!r}")


def options_from(options: type[T], namespace: argparse.Namespace, **given: Any) -> T:
    """An ``options`` dataclass from parsed flags: each field takes the flag of the same name
    (the flags without a field, like --debug, are left out); ``given`` fields replace them (a
    flag parsed further, a field with no flag)."""
    parsed = vars(namespace)
    values = {f.name: parsed[f.name] for f in fields(options) if f.init and f.name in parsed}
    return options(**{**values, **given})


def add_text_options(
    p: argparse.ArgumentParser, title: str, purpose: str
) -> argparse._ArgumentGroup:
    """--calib-text, --calib-jsonl, --calib-field, --calib-dataset and --calib-chat (TextOptions),
    in a group named ``title``; ``purpose`` says what the command does with the text ("calibrate
    on"). At most one of the first, JSON-lines and dataset sources; none: the bundled set.
    Returns the group, for the command's own text flags."""
    text = p.add_argument_group(title)
    text.add_argument(
        "--calib-text",
        metavar="PATH",
        default=default(TextOptions, "calib_text"),
        help=f"UTF-8 text file, or a folder whose {'/'.join(TEXT_SUFFIXES)} files are read in "
        f"sorted order, to {purpose}",
    )
    text.add_argument(
        "--calib-jsonl",
        metavar="FILE",
        default=default(TextOptions, "calib_jsonl"),
        help=f"JSON-lines file with one document per line, to {purpose} instead of "
        "--calib-text (the text is the --calib-field of each)",
    )
    text.add_argument(
        "--calib-field",
        metavar="NAME",
        default=default(TextOptions, "calib_field"),
        help="field of each --calib-jsonl line / column of --calib-dataset holding the text "
        "(default %(default)s)",
    )
    text.add_argument(
        "--calib-dataset",
        metavar="NAME[:SPLIT]",
        default=default(TextOptions, "calib_dataset"),
        help="Hub dataset loaded with the `datasets` package (split train unless given; needs "
        f"the package and Hub access), to {purpose} instead of --calib-text",
    )
    text.add_argument(
        "--calib-chat",
        action="store_true",
        default=default(TextOptions, "calib_chat"),
        help="render the text as user/assistant turns with the model's chat template (for "
        "instruct models, which mostly see templated text when served)",
    )
    return text


def add_scoring_options(p: argparse.ArgumentParser, text_help: str) -> None:
    """--text, --ctx and --max-tokens: the text eval and verify score, in windows."""
    p.add_argument("--text", required=True, metavar="PATH", help=text_help)
    p.add_argument(
        "--ctx",
        type=int,
        default=512,
        help="window length in tokens; each window starts as the tokenizer starts text "
        "(default %(default)s)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=20480,
        help="tokens scored: the first ones of the text, in windows of --ctx (default %(default)s)",
    )


def add_lm_eval_options(p: argparse.ArgumentParser) -> None:
    """--lm-eval-tasks, --lm-eval-backend, --lm-eval-args and --lm-eval-limit: lm-eval tasks run
    on source and converted (needs the lmeval extra)."""
    from converter.measure.lm_eval import BACKENDS, INSTALL_HINT, SHIPPED_TASKS

    g = p.add_argument_group(f"lm-evaluation-harness (optional: {INSTALL_HINT})")
    g.add_argument(
        "--lm-eval-tasks",
        metavar="T1,T2",
        type=lambda s: [t for t in s.split(",") if t],
        help="lm-eval tasks to run on source and converted, side by side: any lm-eval task "
        f"(hub tasks download their data) or the shipped offline ones ({', '.join(SHIPPED_TASKS)})",
    )
    g.add_argument(
        "--lm-eval-backend",
        choices=BACKENDS,
        default=BACKENDS[0],
        help="vllm: vLLM with our plugin, as served; hf: transformers with our remote code "
        "(default %(default)s)",
    )
    g.add_argument(
        "--lm-eval-args",
        metavar="K=V,...",
        default="",
        help="more lm-eval model_args for both models, e.g. dtype=bfloat16,max_model_len=4096",
    )
    g.add_argument(
        "--lm-eval-limit",
        type=int,
        metavar="N",
        help="score only the first N items of each task (default: all)",
    )


def add_debug_option(p: argparse.ArgumentParser) -> None:
    """--debug, which commands/errors.py run_command reads."""
    p.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback instead of a one-line error, and debug logs",
    )
