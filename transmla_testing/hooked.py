"""Run the converter CLI in a subprocess that acts at a chosen point of the conversion: a
signal sent to itself, or a full disk. Shared by the interruption and --resume tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from transmla_testing.launch import converter_cmd, torchrun_args

REPO = Path(__file__).resolve().parent.parent

# Runs the CLI and acts at one point of the conversion: SIGKILL / SIGINT / SIGTERM sent by the
# process to itself, or "full": RLIMIT_FSIZE drops to 1 byte, so the next write really fails with
# EFBIG (what a full disk looks like to the writer).
HOOK = r"""
import os, resource, signal, sys
from converter import cli
from converter.conversion import pipeline
from converter.checkpoint import stream_writer, writer

point, action, argv = sys.argv[1], sys.argv[2], sys.argv[3:]


def act():
    if action == "full":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))
    else:
        os.kill(os.getpid(), getattr(signal, action))


if point.startswith("write:"):  # before the N-th output tensor (1: embeddings, 9 per layer)
    target, seen, write = int(point[6:]), [0], stream_writer.StreamingShardWriter.write

    def hooked(self, name, tensor):
        seen[0] += 1
        if seen[0] == target:
            act()
        return write(self, name, tensor)

    stream_writer.StreamingShardWriter.write = hooked
elif point == "copy":  # shards and config.json written, tokenizer not yet copied
    copy = pipeline.copy_verbatim
    pipeline.copy_verbatim = lambda a, b: (act(), copy(a, b))[1]
elif point == "published":  # just after the finished folder was moved into place
    publish = writer._publish
    writer._publish = lambda tmp, dst: (publish(tmp, dst), act())[0]
sys.exit(cli.main(argv))
"""


def run_hooked(
    tmp_path: Path, point: str, action: str, args: list[str]
) -> subprocess.CompletedProcess:
    script = tmp_path / "hooked_convert.py"
    script.write_text(HOOK)
    return subprocess.run(
        [sys.executable, str(script), point, action, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


# Runs heal and sends SIGKILL / SIGINT / ... to itself just after its N-th save of a point:
# "state" a --resume save, on one rank (RANK, "0" outside torchrun) once the progress file names
# that save (the moment a kill leaves the most to resume from, on a rank that did not write the
# progress file itself); "teacher-text" a finished job of the teacher text, kept for --resume.
HEAL_HOOK = r"""
import json, os, signal, sys, time
from converter import cli
from converter.heal import state, teacher_text


def named(store, step):
    try:
        return json.loads((store.folder / state.PROGRESS).read_text())["step"] == step
    except FileNotFoundError:
        return False


def main():
    after, (action, rank, point), argv = int(sys.argv[1]), sys.argv[2:5], sys.argv[5:]
    seen = [0]

    def act():
        os.kill(os.getpid(), getattr(signal, action))

    if point == "state":
        save = state.HealStore.save

        def hooked(self, trainer):
            save(self, trainer)
            seen[0] += 1
            if seen[0] == after and os.environ.get("RANK", "0") == rank:
                while not named(self, trainer.state.step):
                    time.sleep(0.05)
                act()

        state.HealStore.save = hooked
    elif point == "teacher-text":
        save_partial = teacher_text.save_partial

        def hooked(*args):
            path = save_partial(*args)
            seen[0] += 1
            if seen[0] == after:
                act()
            return path

        teacher_text.save_partial = hooked
    return cli.main(argv)


if __name__ == "__main__":  # not in the teacher-text engine's spawned child, which imports this
    sys.exit(main())
"""


def run_heal_killed(
    tmp_path: Path,
    after: int,
    action: str,
    args: list[str],
    ranks: int = 1,
    rank: int = 0,
    point: str = "state",
) -> subprocess.CompletedProcess:
    """heal (under torchrun with ``ranks`` > 1), rank ``rank`` sending itself ``action`` just
    after its ``after``-th save of ``point`` (HEAL_HOOK)."""
    script = tmp_path / "hooked_heal.py"
    script.write_text(HEAL_HOOK)
    return subprocess.run(
        [sys.executable, *torchrun_args(ranks), str(script)]
        + [str(after), action, str(rank), point, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"} if ranks > 1 else None,
    )


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    """The converter CLI, plain."""
    return subprocess.run(
        converter_cmd(args),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def run_torchrun(
    args: list[str], ranks: int = 2, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """The converter CLI under torchrun on this machine (gloo ranks on the CPU, one thread
    each: two ranks on two cores)."""
    return subprocess.run(
        converter_cmd(args, ranks),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
