"""--resume: a conversion stopped mid-way (Ctrl-C, SIGKILL) continues from its last finished
layer and produces, bit for bit, the checkpoint an uninterrupted run produces."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from converter.checkpoint.resume import resume_folder
from transmla_testing.hooked import run_cli, run_hooked
from transmla_testing.models import make_model, read_tensors

LAYERS = 4


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("resume") / "src", "llama", layers=LAYERS, tied=False)


def run(
    tmp_path: Path, args: list[str], stop_at: int | None = None, sig: str = "SIGKILL"
) -> subprocess.CompletedProcess:
    """The CLI; with ``stop_at`` it sends itself ``sig`` just before the stop_at-th output tensor
    is written (1: embeddings, then 9 per layer), i.e. in the middle of a layer."""
    if stop_at is None:
        return run_cli(args)
    return run_hooked(tmp_path, f"write:{stop_at}", sig, args)


def calibrated(src: Path, calib_file: Path, samples: int) -> list[str]:
    """CLI flags: convert ``src``, calibrating on ``samples`` x 32 tokens of ``calib_file``."""
    return [
        "--src",
        str(src),
        "--calib-text",
        str(calib_file),
        "--calib-samples",
        str(samples),
        "--calib-seqlen",
        "32",
    ]


def layers_done(dst: Path) -> int:
    return json.loads((resume_folder(dst) / "progress.json").read_text())["layers_done"]


@pytest.mark.parametrize("method", ["refit", "sequential-global"])
def test_stopped_runs_resume_to_the_same_checkpoint(src, tmp_path, calib_file, method):
    common = [
        *calibrated(src, calib_file, 6),
        "--rope-dim",
        "8",
        "--kv-lora-rank",
        "24",
        "--method",
        method,
        "--max-shard-size",
        "200KB",
    ]
    straight = tmp_path / "straight"
    assert run(tmp_path, [*common, "--dst", str(straight)]).returncode == 0

    dst = tmp_path / "resumed"
    args = [*common, "--dst", str(dst), "--resume"]
    # Ctrl-C in layer 1: layer 0 is kept, and the user is told how to continue
    proc = run(tmp_path, args, stop_at=1 + 9 + 4, sig="SIGINT")
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr[-2000:]
    assert "rerun the same command" in proc.stderr and not dst.exists()
    assert layers_done(dst) == 1
    # SIGKILL in layer 3 of the continued run: layers 1 and 2 were added
    proc = run(tmp_path, args, stop_at=2 * 9 + 6)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "resuming from" in proc.stderr and not dst.exists()
    assert layers_done(dst) == 3
    earlier = json.loads((resume_folder(dst) / "progress.json").read_text())["seconds"]
    # the last run finishes: same tensors and config as the uninterrupted run, nothing left
    proc = run(tmp_path, args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "3 of 4 layers were done" in proc.stderr
    assert "(with the interrupted runs)" in proc.stderr
    assert not resume_folder(dst).exists()
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in straight.iterdir())
    want, got = read_tensors(straight), read_tensors(dst)
    assert list(want) == list(got) and len(list(dst.glob("*.safetensors"))) > 1
    for name, tensor in want.items():
        assert got[name].equal(tensor), name
    assert (dst / "config.json").read_text() == (straight / "config.json").read_text()
    report = json.loads((dst / "transmla_report.json").read_text())
    assert report["seconds"] > earlier > 0  # the time of all runs
    assert report["layers"] == json.loads((straight / "transmla_report.json").read_text())["layers"]


def test_resume_refuses_other_settings_and_plain_runs_leave_progress_alone(
    src, tmp_path, calib_file
):
    common = [*calibrated(src, calib_file, 4), "--kv-lora-rank", "24"]
    dst = tmp_path / "out"
    proc = run(
        tmp_path, [*common, "--dst", str(dst), "--rope-dim", "8", "--resume"], stop_at=1 + 9 + 2
    )
    assert proc.returncode == -signal.SIGKILL
    assert layers_done(dst) == 1
    proc = run(tmp_path, [*common, "--dst", str(dst), "--rope-dim", "16", "--resume"])
    assert proc.returncode == 2
    assert "different converted config" in proc.stderr and "delete that folder" in proc.stderr
    assert layers_done(dst) == 1  # refused, progress untouched
    # a run without --resume says the progress is there, converts from scratch, keeps it
    proc = run(tmp_path, [*common, "--dst", str(dst), "--rope-dim", "16"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "add --resume to continue it" in proc.stderr
    assert layers_done(dst) == 1
    assert json.loads((dst / "config.json").read_text())["qk_rope_head_dim"] == 16


def test_a_run_stopped_before_its_first_layer_leaves_nothing_behind(src, tmp_path, calib_file):
    """No progress recorded: the next --resume run starts clean, so shards of the stopped run's
    layout (here 200 KB shards) cannot end up next to the new ones."""
    common = [
        *calibrated(src, calib_file, 4),
        "--rope-dim",
        "8",
        "--kv-lora-rank",
        "24",
        "--resume",
    ]
    dst = tmp_path / "out"
    proc = run(tmp_path, [*common, "--dst", str(dst), "--max-shard-size", "200KB"], stop_at=4)
    assert proc.returncode == -signal.SIGKILL
    stale = sorted(p.name for p in resume_folder(dst).glob("*.safetensors"))
    assert stale and not (resume_folder(dst) / "progress.json").exists()
    proc = run(tmp_path, [*common, "--dst", str(dst)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in dst.glob("*.safetensors")) == ["model.safetensors"]
    assert not (dst / "model.safetensors.index.json").exists()


def test_qwen3_moe_resumes_to_the_same_checkpoint(tmp_path, calib_file):
    """The normed attention and the copied experts resume like any layer: layer 0 (experts)
    done, SIGKILL inside layer 1 (dense MLP), the next run finishes bit for bit."""
    src = make_model(tmp_path / "src", "qwen3_moe", tied=False)
    common = [
        *calibrated(src, calib_file, 4),
        "--rope-dim",
        "8",
        "--kv-lora-rank",
        "24",
        "--freqfold",
        "2",
    ]
    straight = tmp_path / "straight"
    assert run(tmp_path, [*common, "--dst", str(straight)]).returncode == 0
    dst = tmp_path / "resumed"
    args = [*common, "--dst", str(dst), "--resume"]
    # embeddings, then layer 0: 9 normed attention tensors, 2 norms, router, 4 experts x 3
    proc = run(tmp_path, args, stop_at=1 + 24 + 5)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert layers_done(dst) == 1
    proc = run(tmp_path, args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    want, got = read_tensors(straight), read_tensors(dst)
    assert list(want) == list(got) and "model.layers.0.mlp.experts.3.down_proj.weight" in got
    for name, tensor in want.items():
        assert got[name].equal(tensor), name
    assert (dst / "config.json").read_text() == (straight / "config.json").read_text()
