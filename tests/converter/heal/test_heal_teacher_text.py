"""heal --teacher-text: the teacher (real vLLM on the CPU) writes the training text, the held-out
rows stay real text (the bundled set's, with no text given), a kill while the text is written or
while the student trains resumes without writing it again and ends at the uninterrupted result,
and bad settings are refused in one line with nothing written."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from converter.checkpoint.resume import resume_folder
from converter.heal.teacher_text import TEACHER_TEXT_FILE
from transmla_testing.conversions import taught_conversion
from transmla_testing.hooked import REPO, run_cli, run_heal_killed
from transmla_testing.models import read_tensors

SEQLEN = 64
TEACHER_TOKENS = 2500
FLAGS = ("--tokens", "2048", "--seqlen", str(SEQLEN), "--batch-size", "8", "--lr", "1e-2")
FLAGS += ("--eval-tokens", "512", "--precision", "fp32", "--keep-worse")


@pytest.fixture(scope="module")
def vllm_pair(tmp_path_factory, calib_file) -> tuple[Path, Path]:
    """A tiny chat LLaMA vLLM's CPU attention takes (head_dim 64) that learned the comedies,
    and its lossy conversion."""
    root = tmp_path_factory.mktemp("teacher-text")
    geometry = dict(hidden=128, heads=2, kv_heads=1, head_dim=64, seed=3)
    return taught_conversion(root, calib_file, SEQLEN, 16, 16, **geometry)


def heal_args(pair, dst: Path, *extra: str) -> list[str]:
    """No --calib-* text: the teacher's text alone is trained on."""
    teacher, student = pair
    return ["heal", "--teacher", str(teacher), "--student", str(student), "--dst", str(dst),
            *FLAGS, "--teacher-text", str(TEACHER_TOKENS), *extra]  # fmt: skip


def test_killed_while_writing_and_while_training_resumes_to_the_uninterrupted_run(
    vllm_pair, tmp_path
):
    straight = tmp_path / "straight"
    proc = run_cli(heal_args(vllm_pair, straight, "--keep-teacher-text"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((straight / "transmla_report.json").read_text())["heal"]
    text = json.loads((straight / TEACHER_TEXT_FILE).read_text())
    assert report["teacher_text"]["tokens"] == sum(text["document_tokens"]) >= TEACHER_TOKENS
    assert report["teacher_text"]["prompting"] == "chat"  # the tiny tokenizer has a template
    data = report["rows"]
    assert data["train_rows_of_teacher_text"] == data["train_rows"] > 0  # no text given
    assert "bundled" in data["held_out_from"]

    dst = tmp_path / "resumed"
    args = heal_args(vllm_pair, dst, "--keep-teacher-text", "--resume")
    # (the run returns only once no process holds its pipes: vLLM's child died with the heal)
    proc = run_heal_killed(tmp_path, 1, "SIGKILL", args, point="teacher-text")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (resume_folder(dst) / TEACHER_TEXT_FILE).is_file() and not dst.exists()
    proc = run_heal_killed(tmp_path, 1, "SIGKILL", args)  # after the first training save
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert "teacher text: continuing after the" in proc.stderr, proc.stderr[-3000:]
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "starting vLLM" not in proc.stderr and "steps were done" in proc.stderr
    assert f"documents from {resume_folder(dst) / TEACHER_TEXT_FILE}" in proc.stderr

    assert json.loads((dst / TEACHER_TEXT_FILE).read_text())["documents"] == text["documents"]
    want, got = read_tensors(straight), read_tensors(dst)
    assert list(want) == list(got)
    for name in want:
        assert got[name].equal(want[name]), name
    resumed = json.loads((dst / "transmla_report.json").read_text())["heal"]
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in report["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in resumed["history"]]
    assert resumed["test"]["ppl"] == report["test"]["ppl"]


@pytest.mark.parametrize(
    "case, says",
    [
        ("zero", "--teacher-text must be a positive number of tokens"),
        ("negative", "--teacher-text must be a positive number of tokens"),
        ("empty prompts", "holds no prompts"),
        ("latin-1 prompts", "is not UTF-8 text"),
        ("no vllm", "needs vLLM to write the teacher text: pip install"),
        ("prompts alone", "--teacher-prompts needs --teacher-text N"),
    ],
)
def test_bad_teacher_text_settings_are_refused_in_one_line(vllm_pair, tmp_path, case, says):
    dst = tmp_path / "out"
    args = heal_args(vllm_pair, dst)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tell me about the sea.\n")
    cmd = [sys.executable, "-m", "converter"]
    if case in ("zero", "negative"):
        args[args.index("--teacher-text") + 1] = "0" if case == "zero" else "-5"
    elif case == "empty prompts":
        prompts.write_text("\n  \n")
        args += ["--teacher-prompts", str(prompts)]
    elif case == "latin-1 prompts":
        prompts.write_bytes("Où est la mer ?\n".encode("latin-1"))
        args += ["--teacher-prompts", str(prompts)]
    elif case == "no vllm":  # how Python marks a package that is not installed
        cmd = [sys.executable, "-c", "import sys; sys.modules['vllm'] = None; "
               "from converter import cli; sys.exit(cli.main(sys.argv[1:]))"]  # fmt: skip
    elif case == "prompts alone":
        i = args.index("--teacher-text")
        args = args[:i] + args[i + 2 :] + ["--teacher-prompts", str(prompts)]
    proc = subprocess.run(cmd + args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines
    assert not dst.exists() and not resume_folder(dst).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.txt"]


@pytest.mark.parametrize(
    "extra, says",
    [
        (("--teacher-text", "3000"), "--teacher-text needs --heal-tokens M"),
        (("--heal-tokens", "2048", "--teacher-text", "0"), "must be a positive number"),
    ],
)
def test_convert_refuses_bad_teacher_text_before_converting(vllm_pair, tmp_path, extra, says):
    dst = tmp_path / "out"
    proc = run_cli(["--src", str(vllm_pair[0]), "--dst", str(dst), *extra])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], lines
    assert not any(tmp_path.iterdir())
