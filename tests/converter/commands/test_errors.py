"""Every command ends an error the same way (commands/errors.py run_command): one ``error:`` line
and exit 2 for what the user can fix (bad input, the file system, memory), 1 and a pointer to
--debug for a bug, 128 + N for signal N, and the traceback only with --debug."""

from __future__ import annotations

import argparse
import errno
import signal

import pytest

from converter.cli import main as cli_main
from converter.commands.errors import run_command
from converter.errors import ConversionError, Interrupted

LONG = "x" * 300  # a path component longer than any file system allows: OSError ENAMETOOLONG


def ns(debug: bool = False, resume: bool = False) -> argparse.Namespace:
    return argparse.Namespace(debug=debug, resume=resume)


def raising(exc: BaseException):
    def work(_args):
        raise exc

    return work


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error")]


@pytest.mark.parametrize(
    "exc,output,status,expected",
    [
        (ConversionError("--tokens 0 must be at least 1"), None, 2, "--tokens 0 must be"),
        (
            OSError(errno.EACCES, "Permission denied", "/models/src/config.json"),
            "out",
            2,
            "Permission denied: /models/src/config.json",  # reading the input, not writing out
        ),
        (
            OSError(errno.ENOSPC, "No space left on device", ".out.partial-1/model.safetensors"),
            "out",
            2,
            "ran out of space writing out",
        ),
        (OSError(errno.ENOSPC, "No space left on device"), "out", 2, "ran out of space writing"),
        (MemoryError(), "out", 2, "out of memory; lower --seqlen"),
        (RuntimeError("boom\nsecond line"), None, 1, "unexpected RuntimeError: boom; rerun with"),
    ],
)
def test_one_line_and_its_status(capsys, exc, output, status, expected):
    rc = run_command(raising(exc), ns(), output=output, memory_hint="lower --seqlen")
    err = capsys.readouterr().err
    assert rc == status, err
    assert error_lines(err) == err.strip().splitlines()  # nothing but the one line
    assert len(error_lines(err)) == 1 and expected in error_lines(err)[0], err


@pytest.mark.parametrize(
    "exc", [ConversionError("bad"), OSError(errno.EIO, "I/O error"), MemoryError(), KeyError("k")]
)
def test_debug_shows_the_traceback(exc):
    with pytest.raises(type(exc)):
        run_command(raising(exc), ns(debug=True), output="out")


def test_the_status_of_the_work_is_the_commands():
    assert run_command(lambda _a: None, ns()) == 0
    assert run_command(lambda _a: 3, ns()) == 3


@pytest.mark.parametrize(
    "exc,output,resume,expected",
    [
        (Interrupted(signal.SIGTERM), None, False, "interrupted (SIGTERM)"),
        (
            Interrupted(signal.SIGTERM),
            "out",
            False,
            "interrupted (SIGTERM): nothing was written to --dst (partial output removed)",
        ),
        (Interrupted(signal.SIGINT), "out", True, ".out.resume; rerun the same command"),
        (Interrupted(signal.SIGHUP, committed=True), "out", True, "after out was complete"),
        (KeyboardInterrupt(), "out", False, "interrupted (SIGINT): nothing was written"),
    ],
)
def test_interrupts_say_what_became_of_the_output(capsys, exc, output, resume, expected):
    rc = run_command(raising(exc), ns(resume=resume), output=output)
    err = capsys.readouterr().err
    assert rc == 128 + getattr(exc, "signum", signal.SIGINT)
    assert expected in err and len(err.strip().splitlines()) == 1, err


def test_sigterm_unwinds_like_ctrl_c(capsys):
    """Every command runs with SIGTERM and SIGHUP turned into an interrupt (before, eval, verify,
    inspect and upload died on SIGTERM with no word, or printed a traceback for Ctrl-C)."""
    before = signal.getsignal(signal.SIGTERM)
    rc = run_command(lambda _a: signal.raise_signal(signal.SIGTERM), ns())
    assert rc == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip() == "interrupted (SIGTERM)"
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize(
    "argv",
    [
        ["heal", "--teacher", LONG, "--student", LONG, "--dst", "OUT", "--tokens", "8"],
        ["eval", "--model", LONG, "--text", LONG],
        ["verify", "--src", LONG, "--dst", LONG, "--text", LONG],
        ["inspect", LONG],
        ["upload", LONG, "--repo-id", "owner/name"],
        ["--src", LONG, "--dst", "OUT"],
    ],
    ids=["heal", "eval", "verify", "inspect", "upload", "convert"],
)
def test_every_command_turns_an_os_error_into_one_line_and_exit_2(capsys, tmp_path, argv):
    """An OSError (here a path too long for the file system) is the user's to fix: one line and
    exit 2 from every command. Before, heal, eval, verify, inspect and upload printed a traceback
    (exit 1), and convert exited 1 with a sentence about writing --dst."""
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    rc = cli_main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: File name too long: xxx"), err[-2000:]
    assert not (tmp_path / "out").exists()
