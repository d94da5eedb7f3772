"""Calibration inputs (file, JSONL, chat, bundled default), budget-driven sizing, FreqFold
chosen on held-out chunks, and the eval / verify commands."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from converter.calibration.text import BUNDLED, CalibrationInput, load_documents
from converter.cli import main as cli_main
from converter.conversion.pipeline import ConvertOptions, convert
from converter.conversion.settings import resolve_settings
from converter.errors import ConversionError
from converter.sources.inspection import inspect_source
from transmla_testing.models import make_model
from transmla_testing.text import play_text

SMOLLM2 = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "num_hidden_layers": 30,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}
LLAMA3_8B = {
    **SMOLLM2,
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 32,
}


@pytest.mark.parametrize(
    "cfg,kw,rope,rank",
    [
        (SMOLLM2, dict(kv_elements=320), 64, 256),  # a size vLLM serves: kept
        (SMOLLM2, dict(kv_elements=192, target="hf"), 32, 160),  # free size, rope <= budget/4
        (SMOLLM2, dict(kv_elements=128, target="hf"), 32, 96),
        (LLAMA3_8B, dict(kv_budget=0.30), 64, 512),  # 614 of 2048 -> 576 for vLLM
        (LLAMA3_8B, dict(kv_budget=0.20), 64, 256),  # 409 -> 320
    ],
)
def test_budget_picks_rope_and_rank(cfg, kw, rope, rank):
    settings = resolve_settings(inspect_source(cfg), None, None, None, None, **kw)
    assert (settings.rope_dim, settings.kv_lora_rank) == (rope, rank)


def test_budget_below_vllm_sizes_is_refused_with_the_fix():
    with pytest.raises(ConversionError, match="--target hf"):
        resolve_settings(inspect_source(SMOLLM2), None, None, None, None, kv_elements=192)
    with pytest.raises(ConversionError, match="not both"):
        resolve_settings(
            inspect_source(SMOLLM2), None, None, None, None, kv_elements=320, kv_budget=0.5
        )


def test_jsonl_and_chat_documents(tmp_path):
    src = make_model(tmp_path / "src", "llama")
    tok = AutoTokenizer.from_pretrained(src)
    path = tmp_path / "docs.jsonl"
    path.write_text(
        "\n".join(json.dumps({"body": t}) for t in ("First doc.\n\nIts reply.", "Second doc."))
        + "\n"
    )
    docs, names = load_documents(CalibrationInput(jsonl=str(path), field="body"), tok)
    assert docs == ["First doc.\n\nIts reply.", "Second doc."] and names == ["docs.jsonl"]
    chat, _ = load_documents(CalibrationInput(jsonl=str(path), field="body", chat=True), tok)
    assert chat == ["<s>user: First doc.\n<s>assistant: Its reply.\n"]
    with pytest.raises(ConversionError, match="no field 'text'"):
        load_documents(CalibrationInput(jsonl=str(path)), tok)


def test_bundled_default_calibration(tmp_path):
    assert sorted(p.name for p in BUNDLED.glob("*.txt")) == [
        "code.txt",
        "dialogue.txt",
        "prose.txt",
    ]
    src = make_model(tmp_path / "src", "qwen2")
    dst = convert(
        ConvertOptions(
            src=str(src),
            dst=str(tmp_path / "dst"),
            rope_dim=8,
            kv_lora_rank=16,
            calib_samples=6,
            calib_seqlen=64,
        )
    )
    calib = json.loads((dst / "config.json").read_text())["transmla"]["calibration"]
    assert calib["source"].startswith("the bundled") and calib["tokens"] == 6 * 64
    assert calib["files"] == ["code.txt", "dialogue.txt", "prose.txt"]


def test_freqfold_auto_picks_the_exact_fold_and_records_scores(tmp_path, calib_file):
    # keys shared across heads: with rope = head_dim, FreqFold 1 is exact, wider folds mix
    # frequencies; the held-out error must find that
    src = make_model(tmp_path / "src", "llama", heads=4, kv_heads=2, head_dim=16, shared_keys=True)
    dst = convert(
        ConvertOptions(
            src=str(src),
            dst=str(tmp_path / "dst"),
            rope_dim=16,
            freqfold="auto",
            kv_lora_rank=32,
            calib_text=str(calib_file),
            calib_samples=16,
            calib_seqlen=64,
        )
    )
    report = json.loads((dst / "transmla_report.json").read_text())["layers"]
    for layer in report:
        scores = {int(k): v for k, v in layer["freqfold_held_out_error"].items()}
        assert layer["freqfold"] == min(scores, key=scores.get) == 1
        assert scores[1] < 1e-8 < max(scores.values())
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["transmla"]["freqfold"] == "auto"
    assert cfg["transmla"]["calibration"]["held_out_chunks"] == 2


def test_eval_and_verify_commands(tmp_path, calib_file, capsys):
    src = make_model(
        tmp_path / "src",
        "llama",
        heads=4,
        kv_heads=2,
        head_dim=16,
        seed=2,
        init=(0.1, 0.6, 0.6, 0.6),
        bos="added",  # as Llama-3: every window starts with <s>, as the tokenizer starts text
    )
    dst = convert(
        ConvertOptions(
            src=str(src),
            dst=str(tmp_path / "dst"),
            rope_dim=8,
            kv_lora_rank=24,
            calib_text=str(calib_file),
            calib_samples=8,
            calib_seqlen=64,
        )
    )
    text = tmp_path / "eval.txt"
    text.write_text(play_text("hamlet", "tragedies")[:20000])
    assert (
        cli_main(
            [
                "eval",
                "--model",
                str(src),
                "--text",
                str(text),
                "--ctx",
                "64",
                "--max-tokens",
                "1024",
                "--json",
            ]
        )
        == 0
    )
    got = json.loads(capsys.readouterr().out)
    # independent: transformers' own loss on the same windows
    tok = AutoTokenizer.from_pretrained(src)
    ids = tok(text.read_text(), add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(1024 // 63):
            row = torch.tensor([[tok.bos_token_id] + ids[i * 63 : (i + 1) * 63]])
            assert tok.bos_token_id == tok("x")["input_ids"][0]
            nll += float(model(row, labels=row).loss) * 63
            n += 63
    assert got["tokens"] == n and got["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-4)

    assert (
        cli_main(
            [
                "verify",
                "--src",
                str(src),
                "--dst",
                str(dst),
                "--text",
                str(text),
                "--ctx",
                "64",
                "--max-tokens",
                "1024",
                "--json",
                "--write-card",
            ]
        )
        == 0
    )
    ver = json.loads(capsys.readouterr().out)
    assert ver["ppl_source"] == pytest.approx(got["ppl"], rel=1e-4)
    assert ver["ppl_converted"] != ver["ppl_source"] and 0.3 < ver["top1_agreement"] < 1
    assert ver["mean_kl"] > 0
    # independent: both models in transformers on the same windows, KL by torch's kl_div
    conv = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32, trust_remote_code=True)
    agree = count = 0
    kl = nll_c = 0.0
    with torch.no_grad():
        for i in range(1024 // 63):
            row = torch.tensor([[tok.bos_token_id] + ids[i * 63 : (i + 1) * 63]])
            ls = model(row).logits[0, :-1].log_softmax(-1)
            lc = conv(row).logits[0, :-1].log_softmax(-1)
            agree += int((ls.argmax(-1) == lc.argmax(-1)).sum())
            kl += float(torch.nn.functional.kl_div(lc, ls, log_target=True, reduction="sum"))
            nll_c += float(conv(row, labels=row).loss) * 63
            count += 63
    assert ver["tokens"] == count
    assert ver["top1_agreement"] == pytest.approx(agree / count, abs=1e-12)
    assert ver["mean_kl"] == pytest.approx(kl / count, rel=1e-4)
    assert ver["ppl_converted"] == pytest.approx(math.exp(nll_c / count), rel=1e-4)
    report = json.loads((dst / "transmla_report.json").read_text())
    assert report["verification"]["top1_agreement"] == ver["top1_agreement"]
    # the card shows the verified figures themselves, not just a heading
    card = (dst / "README.md").read_text()
    for figure in (
        f"{ver['ppl_source']:.3f}",
        f"{ver['ppl_converted']:.3f}",
        f"{ver['top1_agreement']:.2%}",
        f"{ver['mean_kl']:.4f}",
    ):
        assert figure in card, figure
