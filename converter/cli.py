"""Command line entry: ``python -m converter [COMMAND] ...``.

Conversion is the default command (no name needed); every other command is a module in
``converter/commands`` with ``main(argv) -> int``. A ConversionError ends any command with one
line on stderr and exit code 2 (``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import importlib
import sys

from converter.commands import COMMANDS
from converter.errors import ConversionError


def run_subcommand(name: str, argv: list[str]) -> int:
    module = importlib.import_module(f"converter.commands.{name}")
    try:
        return module.main(argv)
    except ConversionError as exc:
        if "--debug" in argv:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        return run_subcommand(argv[0], argv[1:])
    from converter.commands.convert import main as convert_main

    return convert_main(argv)
