"""Errors the CLI turns into one clear sentence and a non-zero exit (no traceback)."""

from __future__ import annotations

import contextlib
import errno
import signal
import threading


class ConversionError(Exception):
    """A problem the user can fix (bad input, impossible settings); the message says how."""


class UnsupportedModelError(ConversionError):
    """The source model uses a feature the conversion cannot keep exact or meaningful."""


class Interrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM / SIGHUP: unwinds like Ctrl-C so the staging folder is removed.

    ``committed`` is true when the signal arrived while the finished checkpoint was being moved
    into place (it was deferred until the move completed, so --dst is complete)."""

    def __init__(self, signum: int = signal.SIGINT, committed: bool = False) -> None:
        super().__init__(signum)
        self.signum, self.committed = signum, committed


# signals that unwind like Ctrl-C (SIGHUP does not exist on Windows)
INTERRUPT_SIGNALS = tuple(
    getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)
)


@contextlib.contextmanager
def signals_as_interrupts():
    """SIGTERM and SIGHUP unwind like Ctrl-C (Interrupted), so staging folders are removed.

    The handler's exception can land inside native code (safetensors' reader, a torch kernel),
    which may turn it into its own error ("could not determine the shape of object type
    UntypedStorage"); any error raised after a signal was received is reported as that signal,
    so the user reads "interrupted", not a damaged-file message.
    """

    received: list[int] = []  # signals the handler has raised, newest last

    def handler(signum, _frame):
        received.append(signum)
        raise Interrupted(signum)

    saved = {}
    if threading.current_thread() is threading.main_thread():
        for sig in INTERRUPT_SIGNALS:
            saved[sig] = signal.signal(sig, handler)
    try:
        yield
    except Exception as exc:
        if received:
            raise Interrupted(received[-1]) from exc
        raise
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NO_ACCESS = (errno.EACCES, errno.EPERM, errno.EROFS)


def describe_os_error(exc: OSError, dst: object) -> str:
    """One sentence for an OSError met while converting into ``dst``."""
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    reason = exc.strerror or str(exc)
    if exc.errno in NO_SPACE:
        return (
            f"ran out of space writing {dst}: {reason}{where}; the partial output was "
            "removed: free some space or choose another --dst"
        )
    if exc.errno in NO_ACCESS:
        return (
            f"{reason}{where} while converting into {dst}: fix the permissions or choose a "
            "--dst this user can write to"
        )
    return f"I/O error while converting into {dst}: {reason}{where}"
