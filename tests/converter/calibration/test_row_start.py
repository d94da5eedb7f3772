"""Rows start the way the model's own tokenizer starts text, for the three conventions real
checkpoints follow: BOS defined and added (Llama-3), defined and never added (SmolLM2, GGUF-built
tokenizers), none at all (Hub Qwen2.5 / Qwen3). Calibration, eval and heal all cut their rows
that way, and the conversion and heal reports say which it was."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from converter.calibration.chunks import row_start, token_chunks
from converter.cli import main as cli_main
from converter.conversion.pipeline import ConvertOptions, convert
from converter.heal.data import split_text
from transmla_testing.hooked import run_cli
from transmla_testing.models import make_model
from transmla_testing.text import play_text

# what each convention's tokenizer puts before text, written out from how make_tokenizer
# builds it (<s> is id 1 in every one of them), not from the code under test
EXPECTED_START = {"added": [1], "defined": [], "none": []}


@pytest.fixture(scope="module", params=sorted(EXPECTED_START))
def model(request, tmp_path_factory) -> tuple[str, Path]:
    folder = tmp_path_factory.mktemp(f"bos-{request.param}") / "src"
    make_model(folder, "llama", hidden=64, heads=4, kv_heads=2, head_dim=16, bos=request.param)
    return request.param, folder


def test_the_tokenizer_decides_how_rows_start(model):
    convention, src = model
    tok = AutoTokenizer.from_pretrained(src)
    start = row_start(tok)
    assert list(start.ids) == EXPECTED_START[convention]
    assert (tok.bos_token is None) == (convention == "none")
    text = play_text("twelfth-night")[:20000]
    ids = tok(text + "\n\n", add_special_tokens=False)["input_ids"]
    head = EXPECTED_START[convention]
    body = 64 - len(head)
    # calibration chunks: spread over the text, each the start + body tokens
    chunks = token_chunks(tok, text, 4, 64)
    stride = len(ids) // body // 4
    for i, row in enumerate(chunks):
        want = head + ids[i * stride * body : (i * stride + 1) * body]
        assert row.tolist() == want
    # heal's rows: contiguous, same start
    data = split_text(tok, [text], 64, 256)
    assert data.train[0].tolist() == head + ids[:body]
    assert data.describe()["start"]["ids"] == head


@pytest.fixture(scope="module")
def converted(model, tmp_path_factory, calib_file) -> tuple[str, Path, Path]:
    convention, src = model
    dst = convert(
        ConvertOptions(
            src=str(src),
            dst=str(tmp_path_factory.mktemp(f"mla-{convention}") / "mla"),
            rope_dim=8,
            kv_lora_rank=16,
            calib_text=str(calib_file),
            calib_samples=4,
            calib_seqlen=64,
            method="refit",
        )
    )
    return convention, src, dst


def test_conversion_eval_and_heal_record_and_use_the_start(converted, tmp_path, calib_file, capsys):
    convention, src, dst = converted
    head = EXPECTED_START[convention]
    config = json.loads((dst / "config.json").read_text())
    assert config["transmla"]["calibration"]["row_start"]["ids"] == head
    text = tmp_path / "eval.txt"
    text.write_text(play_text("hamlet", "tragedies")[:12000])
    argv = ["eval", "--model", str(dst), "--text", str(text), "--ctx", "64", "--max-tokens", "640"]
    assert cli_main([*argv, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    # independent: windows rebuilt from the tokenizer's own output, scored in transformers
    tok = AutoTokenizer.from_pretrained(src)
    ids = tok(text.read_text(), add_special_tokens=False)["input_ids"]
    body = 64 - len(head)
    rows = torch.tensor([head + ids[i * body : (i + 1) * body] for i in range(640 // body)])
    model = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32, trust_remote_code=True)
    with torch.no_grad():
        logits = model(rows).logits[:, :-1]
    nll = float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()))
    assert got["tokens"] == rows[:, 1:].numel()
    assert got["ppl"] == pytest.approx(math.exp(nll), rel=1e-4)
    # heal cuts its rows the same way and records it
    out = tmp_path / "healed"
    proc = run_cli(
        [
            "heal",
            *("--teacher", str(src), "--student", str(dst), "--dst", str(out)),
            *("--tokens", "1024", "--calib-text", str(calib_file), "--seqlen", "64"),
            *("--batch-size", "4", "--eval-tokens", "256", "--precision", "fp32"),
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    heal = json.loads((out / "transmla_report.json").read_text())["heal"]
    assert heal["rows"]["start"]["ids"] == head
    reason = {"added": "adds <s>", "defined": "defines BOS <s> but does not add", "none": "adds no"}
    assert reason[convention] in heal["rows"]["start"]["reason"]
    assert reason[convention] in proc.stderr
