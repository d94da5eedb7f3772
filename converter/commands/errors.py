"""How every command ends when it does not finish: one line on stderr and an exit status, the
same for all of them (``--debug`` shows the traceback instead).

    2        a problem the user can fix, the line says which: bad input or settings
             (ConversionError), the file system (OSError: a file that cannot be read, no space
             left, no permission), not enough memory
    128 + N  interrupted by signal N (Ctrl-C, SIGTERM, SIGHUP); what became of the output is said
    1        anything else: a bug, to rerun with --debug and report
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from os import PathLike
from pathlib import Path

from converter.errors import NO_SPACE, ConversionError, describe_os_error, signals_as_interrupts

USER_ERROR = 2
BUG = 1


def run_command(
    work: Callable[[argparse.Namespace], int | None],
    args: argparse.Namespace,
    output: str | None = None,
    memory_hint: str = "use a machine with more memory",
) -> int:
    """``work(args)`` with SIGTERM and SIGHUP unwinding like Ctrl-C; its status (0 for None), or
    the status of what stopped it, said in one line. ``output``: the folder the command writes
    (None: it writes none), named when an OSError is met inside it and when interrupted (with
    ``args.resume``: where the progress is). ``memory_hint`` says what lowers the memory."""
    try:
        with signals_as_interrupts():
            status = work(args)
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM, SIGHUP
        return interrupted(exc, output, getattr(args, "resume", False))
    except (ConversionError, OSError, MemoryError) as exc:
        if args.debug:
            raise
        return fail(describe(exc, output, memory_hint), USER_ERROR)
    except Exception as exc:  # a bug: one line, and how to get the traceback
        if args.debug:
            raise
        what = f"unexpected {type(exc).__name__}: {_first_line(exc)}"
        return fail(f"{what}; rerun with --debug for the traceback and report it", BUG)
    return 0 if status is None else status


def fail(message: str, status: int) -> int:
    # one write, so the lines of several torchrun ranks cannot interleave
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    return status


def describe(exc: Exception, output: str | None, memory_hint: str) -> str:
    """The one line for a ConversionError, an OSError or a MemoryError."""
    if isinstance(exc, MemoryError):
        return f"out of memory; {memory_hint}"
    if isinstance(exc, OSError):
        if output is not None and _writing(exc, Path(output)):
            return describe_os_error(exc, output)
        reason = exc.strerror or _first_line(exc) or type(exc).__name__
        return f"{reason}: {exc.filename}" if getattr(exc, "filename", None) else reason
    return str(exc)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def _writing(exc: OSError, output: Path) -> bool:
    """Whether ``exc`` was met writing ``output``: in it or in one of its hidden siblings
    (.NAME.partial-*, .NAME.resume, ...), or out of space with no file named."""
    if not isinstance(getattr(exc, "filename", None), str | PathLike):
        return exc.errno in NO_SPACE
    path, out = Path(exc.filename).absolute(), output.absolute()
    for inside in (path, *path.parents):
        if inside == out or (
            inside.parent == out.parent and inside.name.startswith(f".{out.name}.")
        ):
            return True
    return False


def interrupted(exc: KeyboardInterrupt, output: str | None, resume: bool) -> int:
    """The line for an interrupted command; 128 + the signal's number."""
    signum = getattr(exc, "signum", signal.SIGINT)
    name = signal.Signals(signum).name
    if output is None:
        message = f"interrupted ({name})"
    elif getattr(exc, "committed", False):
        message = f"interrupted ({name}) after {output} was complete; it is kept"
    elif resume:
        from converter.checkpoint.resume import resume_folder

        message = (
            f"interrupted ({name}): progress kept in {resume_folder(Path(output))}; rerun the "
            "same command (with --resume) to continue"
        )
    else:
        message = f"interrupted ({name}): nothing was written to --dst (partial output removed)"
    print(message, file=sys.stderr)
    return 128 + signum
