"""The command line: clear refusals before heavy work, sharded output, nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from transmla_testing.models import make_model


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "converter", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory) -> Path:
    return make_model(
        tmp_path_factory.mktemp("cli") / "src",
        "llama",
        heads=4,
        kv_heads=2,
        head_dim=16,
        tied=False,
    )


def edited_copy(src: Path, dst: Path, **changes) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    (dst / "config.json").unlink()
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    "changes,expected",
    [
        ({"model_type": "olmo2", "architectures": ["Olmo2ForCausalLM"]}, "q/k RMSNorm"),
        ({"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"]}, "already MLA"),
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "unknown model_type"),
        ({"mlp_bias": True}, "MLP biases"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "'yarn'"),
    ],
)
def test_unsupported_sources_are_refused_clearly(tiny_src, tmp_path, calib_file, changes, expected):
    src = edited_copy(tiny_src, tmp_path / "src", **changes)
    proc = run_cli(
        "--src", str(src), "--dst", str(tmp_path / "out"), "--calib-text", str(calib_file)
    )
    assert proc.returncode == 2
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_qwen3_converts_with_its_qk_norm(tmp_path, calib_file):
    """Qwen3 was refused (per-head q/k RMSNorm); it now converts through the normed path."""
    src = make_model(tmp_path / "src", "qwen3", heads=4, kv_heads=2, head_dim=16, tied=False)
    out = tmp_path / "out"
    proc = run_cli(
        "--src",
        str(src),
        "--dst",
        str(out),
        "--calib-text",
        str(calib_file),
        "--rope-dim",
        "8",
        "--kv-lora-rank",
        "24",
        "--calib-samples",
        "4",
        "--calib-seqlen",
        "32",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["transmla"]["qk_norm"] == {"num_kv_heads": 2, "head_dim": 16, "eps": 1e-6}
    assert cfg["transmla"]["source_architecture"] == "Qwen3ForCausalLM"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.kv_a_key_map.weight" in names
    assert "model.layers.0.self_attn.q_proj.weight" not in names


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--rope-dim", "6"], "even divisor of head_dim 16"),
        (["--rope-dim", "8", "--freqfold", "1"], "multiple of 2"),
        (["--kv-lora-rank", "0"], "at least 1"),
    ],
)
def test_impossible_settings_are_refused(tiny_src, tmp_path, calib_file, args, expected):
    proc = run_cli(
        "--src",
        str(tiny_src),
        "--dst",
        str(tmp_path / "out"),
        "--calib-text",
        str(calib_file),
        *args,
    )
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_too_short_calibration_says_how_many_tokens(tiny_src, tmp_path):
    (tmp_path / "short.txt").write_text("To be, or not to be.")
    proc = run_cli(
        "--src",
        str(tiny_src),
        "--dst",
        str(tmp_path / "out"),
        "--calib-text",
        str(tmp_path / "short.txt"),
        "--calib-seqlen",
        "64",
    )
    assert proc.returncode == 2 and "tokens found" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_non_empty_destination_needs_overwrite(tiny_src, tmp_path, calib_file):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    proc = run_cli(
        "--src", str(tiny_src), "--dst", str(tmp_path / "out"), "--calib-text", str(calib_file)
    )
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_sharded_output_loads_and_rank_is_clipped(tiny_src, tmp_path, calib_file):
    out = tmp_path / "out"
    proc = run_cli(
        "--src",
        str(tiny_src),
        "--dst",
        str(out),
        "--calib-text",
        str(calib_file),
        "--calib-samples",
        "4",
        "--calib-seqlen",
        "64",
        "--rope-dim",
        "8",
        "--kv-lora-rank",
        "999",
        "--max-shard-size",
        "60KB",
    )
    assert proc.returncode == 0, proc.stderr
    assert "clipped to 56" in proc.stderr  # 2 * (2 * 16) - 8
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1
    stored = set()
    for f in files:
        with safe_open(str(out / f), "pt") as fh:
            stored |= set(fh.keys())
    assert stored == set(index["weight_map"])
    assert "lm_head.weight" in stored and not any("kv_a_layernorm" in k for k in stored)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kv_lora_rank"] == 56 and cfg["transmla"]["freqfold"] == "auto"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=True)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (tiny_src / name).read_bytes()
