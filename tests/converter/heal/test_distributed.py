"""heal under torchrun (gloo ranks on the CPU, FSDP2): two ranks train what one process trains
on the same global batch, each holding half of the trained weights; what it reports is what its
files measure in transformers; bad launches are refused in one line with nothing written."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from converter.checkpoint.resume import resume_folder
from converter.heal.memory import trainable_names
from converter.measure.perplexity import load_model
from transmla_testing import conversions
from transmla_testing.heal_rows import SEQLEN, eval_text_rows, nll
from transmla_testing.hooked import REPO, run_cli, run_heal_killed, run_torchrun
from transmla_testing.models import read_tensors
from transmla_testing.text import play_text
from transmla_vllm.checkpoint_format import CheckpointLayout

FLAGS = ("--seqlen", str(SEQLEN), "--batch-size", "8", "--lr", "1e-2", "--eval-tokens", "1024")
FLAGS += ("--precision", "fp32", "--keep-worse")


def args(pair, dst: Path, calib_file: Path, *extra: str, tokens: int = 8192) -> list[str]:
    return conversions.heal_args(*pair, dst, tokens, calib_file, *FLAGS, *extra)


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "much-ado.txt"  # a comedy the models never saw
    path.write_text(play_text("much-ado-about-nothing")[:20000])
    return path


@pytest.fixture(scope="module")
def healed(pair, calib_file, eval_text, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """The same heal in one process and over two ranks: (folder, stderr) each."""
    root = tmp_path_factory.mktemp("ranks")
    out = {}
    for name, run in (("one", run_cli), ("two", run_torchrun)):
        proc = run(args(pair, root / name, calib_file, "--eval-text", str(eval_text)))
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = (root / name, proc.stderr)
    return out


def test_two_ranks_train_what_one_process_trains(healed, pair):
    (one, _), (two, log) = healed["one"], healed["two"]
    want, got = read_tensors(one), read_tensors(two)
    assert list(want) == list(got)
    frozen = read_tensors(pair[1])
    for name, w in want.items():
        if ".self_attn." not in name:  # frozen: written back bit for bit by both
            assert w.equal(got[name]) and w.equal(frozen[name]), name
        else:
            # the gradients are summed in another order over two ranks: AdamW's step is about
            # lr x RMS per entry whatever that order, so the weights agree far below one step
            # (1e-2 of a tensor's RMS), measured 0 to 1e-6 of a tensor's largest entry
            scale = float(w.abs().max())
            assert float((w - got[name]).abs().max()) <= 1e-4 * scale, name
    reports = {k: json.loads((f / "transmla_report.json").read_text())["heal"] for k, (f, _) in
               healed.items()}  # fmt: skip
    for key in ("teacher", "before", "after"):
        a, b = reports["one"]["test"]["ppl"][key], reports["two"]["test"]["ppl"][key]
        assert a == pytest.approx(b, rel=1e-4), key
    assert reports["two"]["settings"]["launch"] == {"ranks": 2, "nodes": 1, "backend": "gloo"}
    assert reports["one"]["settings"]["launch"]["ranks"] == 1
    assert "torchrun, 2 ranks on 1 node(s), gloo" in (two / "README.md").read_text()
    # rank 0 alone logs: one line per evaluation, not one per rank
    evaluations = len(reports["two"]["history"])
    assert log.count("validation PPL") == evaluations + 1  # and the final summary line


def test_reported_figures_are_what_the_files_measure(healed, pair, eval_text):
    """The two-rank run's test PPL of the teacher, the input and its written folder, against
    transformers on those folders and the test rows rebuilt from --eval-text (the first 1024
    tokens)."""
    folder, _ = healed["two"]
    test = json.loads((folder / "transmla_report.json").read_text())["heal"]["test"]["ppl"]
    rows = eval_text_rows(pair[0], eval_text.read_text(), SEQLEN, 1024)
    for key, path in (("teacher", pair[0]), ("before", pair[1]), ("after", folder)):
        assert test[key] == pytest.approx(math.exp(nll(load_model(path), rows)), rel=1e-4), key
    assert test["after"] < test["before"]


def test_each_rank_holds_half_of_the_trained_weights(healed, pair):
    folder, _ = healed["two"]
    memory = json.loads((folder / "transmla_report.json").read_text())["heal"]["memory"]
    layout = CheckpointLayout.from_config(json.loads((folder / "config.json").read_text()))
    tensors = read_tensors(folder)
    total = sum(tensors[n].numel() * 4 for n in trainable_names(layout, "attention"))  # fp32
    held = memory["trained_bytes_by_rank"]
    assert len(held) == 2 and sum(held) == total
    assert all(0.45 <= h / total <= 0.55 for h in held)
    assert len(memory["peak_bytes_by_rank"]) == 2 and memory["estimate_bytes"]["ranks"] == 2
    # two ranks on this machine each plan with half its RAM (MemAvailable moves between runs)
    one = json.loads((healed["one"][0] / "transmla_report.json").read_text())["heal"]["memory"]
    halves = memory["estimate_bytes"]["available"] / one["estimate_bytes"]["available"]
    assert 0.4 < halves < 0.6


def test_kill_9_of_either_rank_resumes_and_two_ranks_resume_on_one(
    healed, pair, calib_file, eval_text, tmp_path
):
    """kill -9 of rank 1, then of rank 0 (each just after a --resume save), each time the same
    torchrun command continues; then one process continues the two ranks' state, resharded by
    torch.distributed.checkpoint, and ends at the uninterrupted two-rank result."""
    dst = tmp_path / "resumed"
    argv = args(pair, dst, calib_file, "--eval-text", str(eval_text), "--resume")
    proc = run_heal_killed(tmp_path, 2, "SIGKILL", argv, ranks=2, rank=1)  # after 4 of 16 steps
    assert proc.returncode != 0 and not dst.exists(), proc.stderr[-3000:]
    proc = run_heal_killed(tmp_path, 2, "SIGKILL", argv, ranks=2, rank=0)  # after 8 of 16
    assert proc.returncode != 0 and not dst.exists(), proc.stderr[-3000:]
    assert "4 of 16 steps were done" in proc.stderr, proc.stderr[-3000:]
    proc = run_cli(argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 of 16 steps were done" in proc.stderr
    assert "saved by 2 ranks; torch.distributed.checkpoint reshards it for 1" in proc.stderr
    assert not resume_folder(dst).exists()
    straight, _ = healed["two"]
    want, got = read_tensors(straight), read_tensors(dst)
    assert list(want) == list(got)
    for name, w in want.items():  # the tolerance of one rank against two (above)
        assert float((w - got[name]).abs().max()) <= 1e-4 * float(w.abs().max()), name
    history = [
        json.loads((d / "transmla_report.json").read_text())["heal"]["history"]
        for d in (straight, dst)
    ]
    assert [h["step"] for h in history[0]] == [h["step"] for h in history[1]]
    for a, b in zip(*history, strict=True):
        assert a["validation_nll"] == pytest.approx(b["validation_nll"], rel=1e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_train_all_weights_as_one_process_does(pair, calib_file, tmp_path):
    """--train all: the embeddings, final norm and tied head stay whole on every rank and are
    trained too; their gradients are averaged over ranks before the clip and the step, so both
    ranks keep one model, the one a single process trains (same tolerance as above)."""
    runs = {}
    for name, run in (("one", run_cli), ("two", run_torchrun)):
        dst = tmp_path / name
        proc = run(args(pair, dst, calib_file, "--train", "all"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = dst
    want, got = read_tensors(runs["one"]), read_tensors(runs["two"])
    frozen = read_tensors(pair[1])
    assert list(want) == list(got)
    assert not want["model.embed_tokens.weight"].equal(frozen["model.embed_tokens.weight"])
    for name, w in want.items():
        assert float((w - got[name]).abs().max()) <= 1e-4 * float(w.abs().max()), name
    one, two = (json.loads((runs[k] / "transmla_report.json").read_text())["heal"] for k in runs)
    assert two["test"]["ppl"]["after"] == pytest.approx(one["test"]["ppl"]["after"], rel=1e-4)
    assert two["settings"]["train"] == "all"


def test_a_global_batch_the_ranks_do_not_divide_is_refused_in_one_line(pair, calib_file, tmp_path):
    dst = tmp_path / "out"
    proc = run_torchrun(args(pair, dst, calib_file, "--batch-size", "3"))
    assert proc.returncode != 0
    says = "--batch-size 3 is the global batch and must be a multiple"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and all(says in line for line in errors), proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_unwritable_dst_and_unreachable_rank_are_refused_in_one_line(pair, calib_file, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    proc = run_torchrun(args(pair, blocker / "out", calib_file))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and len(errors) == 2, proc.stderr[-2000:]
    assert all(str(blocker) in line for line in errors)
    # rank 1 of 2 whose rank 0 never comes: gives up after --dist-timeout, exit 2, one line
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    dst = tmp_path / "lonely"
    proc = subprocess.run(
        [sys.executable, "-m", "converter", *args(pair, dst, calib_file, "--dist-timeout", "5")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "rank 1 of 2 could not reach the others" in lines[0], lines
    assert not dst.exists()
