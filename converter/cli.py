"""Command line entry: ``python -m converter [COMMAND] ...``.

Conversion is the default command (no name needed); every other command is a module in
``converter/commands`` with ``main(argv) -> int``. Every command ends an error the same way, in
one line on stderr and an exit status (converter/commands/errors.py run_command; ``--debug``
shows the traceback instead).
"""

from __future__ import annotations

import importlib
import sys

from converter.commands import COMMANDS


def run_subcommand(name: str, argv: list[str]) -> int:
    return importlib.import_module(f"converter.commands.{name}").main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        return run_subcommand(argv[0], argv[1:])
    from converter.commands.convert import main as convert_main

    return convert_main(argv)
