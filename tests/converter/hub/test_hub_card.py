"""The model card of a real converted checkpoint, read back with huggingface_hub's own parser:
Hub metadata (base model, relation, license, tags) and a body whose numbers match the
conversion."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.repocard import metadata_load

from converter.checkpoint.source import read_config
from converter.hub.card import refresh_model_card, write_model_card
from converter.hub.card.metadata import BASE_MODEL_RELATION, TAGS
from converter.hub.card.snippets import LOCAL_MODEL_REF
from converter.hub.licence import source_license
from converter.sources.inspection import inspect_source
from transmla_testing.fake_hub import SOURCE_HUB_ID, SOURCE_LICENSE, tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, calib_file) -> tuple[Path, Path]:
    return tiny_checkpoint(tmp_path_factory.getbasetemp(), calib_file)


def card_inputs(src: Path, dst: Path) -> tuple:
    config = json.loads((dst / "config.json").read_text())
    summary = json.loads((dst / "transmla_report.json").read_text())
    return inspect_source(read_config(src)), config, summary


def test_metadata_is_what_the_hub_parses(checkpoint):
    src, dst = checkpoint
    card = ModelCard.load(dst / "README.md")
    meta = card.data.to_dict()
    assert meta == metadata_load(dst / "README.md")
    # the source was a hub cache snapshot of acme/tiny-qwen: its id, not the path, is the base
    assert meta["base_model"] == SOURCE_HUB_ID
    assert meta["base_model_relation"] == BASE_MODEL_RELATION == "quantized"
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert set(TAGS) <= set(meta["tags"]) and set(TAGS) == {
        "mla",
        "transmla",
        "vllm",
        "deepseek_v3",
    }
    for key, value in SOURCE_LICENSE.items():  # carried from the source card, "other" + link
        assert meta[key] == value
    assert card.text.lstrip().startswith("# tiny-qwen with Multi-head Latent Attention")


def test_body_numbers_match_the_conversion(checkpoint):
    src, dst = checkpoint
    spec, config, summary = card_inputs(src, dst)
    text = ModelCard.load(dst / "README.md").text
    tm, layers = config["transmla"], config["num_hidden_layers"]
    before = summary["kv_elements_per_token_per_layer"]["source"]
    after = summary["kv_elements_per_token_per_layer"]["converted"]
    assert (before, after) == (2 * spec.num_kv_heads * spec.head_dim, 24 + 8)
    assert f"| elements per layer | {before:,} | {after:,} |" in text
    assert (
        f"| bytes, bf16, all {layers} layers | {2 * before * layers:,} | "
        f"{2 * after * layers:,} |" in text
    )
    assert f"**{100 * summary['kv_reduction']:.1f}%** ({before / after:.2f}x" in text
    assert "zero-pads this 32-wide cache entry" in text  # 24 + 8 < 576: vLLM pads at load
    for row in (
        f"| rope_dim (shared rope key) | {tm['rope_dim']} |",
        f"| kv_lora_rank (latent) | {tm['kv_lora_rank']} |",
        f"| freqfold | {tm['freqfold']} |",
        f"| calibration tokens | {tm['calibration']['tokens']:,} (4 chunks x 32 tokens) |",
        f"| method | {tm['method']} |",
        f"| converter | transmla-vllm {tm['converter_version']} |",
        f"| source | [{SOURCE_HUB_ID}](https://huggingface.co/{SOURCE_HUB_ID}) |",
    ):
        assert row in text, row
    assert "No comparison with the source was recorded" in text
    # copy-paste usage for vLLM (GPU and CPU) and transformers
    # not on PyPI yet: the card must not send people to a package index page that does not exist
    assert 'pip install ".[vllm]"' in text and "not on PyPI yet" in text
    assert "pypi.org" not in text and "pip install transmla-vllm" not in text
    assert f"vllm serve {LOCAL_MODEL_REF} --trust-remote-code" in text
    assert (
        f"python -m vllm.entrypoints.openai.api_server --model {LOCAL_MODEL_REF} "
        "--trust-remote-code"
    ) in text and "--kv-cache-memory-bytes" in text
    assert (
        f'AutoModelForCausalLM.from_pretrained("{LOCAL_MODEL_REF}", trust_remote_code=True)'
    ) in text


def test_verification_figures_and_repo_id(checkpoint, tmp_path):
    src, dst = checkpoint
    spec, config, summary = card_inputs(src, dst)
    verification = {
        "ppl_source": 12.5,
        "ppl_converted": 13.0,
        "top1_agreement": 0.975,
        "mean_kl": 0.01234,
        "tokens": 4096,
    }
    write_model_card(
        tmp_path,
        spec,
        config,
        summary,
        SOURCE_HUB_ID,
        src,
        verification=verification,
        repo_id="someone/tiny-qwen-mla",
    )
    card = ModelCard.load(tmp_path / "README.md")
    text = card.text
    for row in (
        "| perplexity, source | 12.500 |",
        "| perplexity, converted | 13.000 |",
        "| perplexity change | +4.00% |",
        "| top-1 next-token agreement | 97.50% |",
        "| mean KL(source || converted), nats/token | 0.0123 |",
        "| evaluation tokens | 4,096 |",
    ):
        assert row in text, row
    assert "No comparison" not in text
    assert "vllm serve someone/tiny-qwen-mla --trust-remote-code" in text
    assert LOCAL_MODEL_REF not in text
    assert card.data.base_model == SOURCE_HUB_ID  # a hub id given as --src is kept as is


def test_local_source_without_license_has_no_base_model(checkpoint, tmp_path):
    """A plain local folder: the Hub rejects paths as base_model, so there is none (and no
    relation); no license is invented."""
    src, dst = checkpoint
    spec, config, summary = card_inputs(src, dst)
    plain = tmp_path / "my-llama"
    plain.mkdir()
    (plain / "config.json").write_text((src / "config.json").read_text())
    write_model_card(tmp_path, spec, config, summary, str(plain), plain)
    meta = metadata_load(tmp_path / "README.md")
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert not {"license", "license_name", "license_link"} & set(meta)
    assert "This is the local folder `my-llama`" in ModelCard.load(tmp_path / "README.md").text


def test_license_falls_back_to_config(tmp_path):
    (tmp_path / "README.md").write_text("---\ntags:\n- x\n---\nno licence here\n")
    (tmp_path / "config.json").write_text(json.dumps({"license": "mit"}))
    assert source_license(tmp_path) == {"license": "mit"}
    (tmp_path / "README.md").write_text("---\nlicense: llama3.1\n---\n")
    assert source_license(tmp_path) == {"license": "llama3.1"}


def test_refresh_after_verify_keeps_metadata(checkpoint, tmp_path):
    """What ``verify --write-card`` does: figures go into transmla_report.json, the card is
    rewritten from the folder alone; base model, license and user-added metadata stay."""
    _, dst = checkpoint
    folder = tmp_path / "mla"
    shutil.copytree(dst, folder)
    card_path = folder / "README.md"
    card_path.write_text(card_path.read_text().replace("---\n", "---\nlanguage: en\n", 1))
    report = json.loads((folder / "transmla_report.json").read_text())
    report["verification"] = {
        "ppl_source": 20.0,
        "ppl_converted": 21.0,
        "top1_agreement": 0.9,
        "mean_kl": 0.05,
        "tokens": 512,
        "text": "held-out.txt",
        "ctx": 64,
    }
    (folder / "transmla_report.json").write_text(json.dumps(report))
    before = metadata_load(card_path)
    refresh_model_card(folder)
    meta, text = metadata_load(card_path), ModelCard.load(card_path).text
    assert meta == before and meta["language"] == "en" and meta["license"] == "other"
    for row in (
        "| perplexity change | +5.00% |",
        "| top-1 next-token agreement | 90.00% |",
        "| evaluation text | `held-out.txt` |",
        "| context per window | 64 |",
    ):
        assert row in text, row
    assert "Qwen2ForCausalLM: 4 query heads, 2 KV heads x head_dim 16" in text
    assert f"| source | [{SOURCE_HUB_ID}](https://huggingface.co/{SOURCE_HUB_ID}) |" in text


def test_base_model_flag_links_a_local_source(tmp_path, calib_file, capsys):
    """--base-model gives a conversion of a local folder the Hub id of its source: recorded in
    config.json and written as the card's base_model (with the relation); a malformed id is
    refused before anything is written."""
    from converter.cli import main as cli_main
    from converter.hub import validate_folder
    from transmla_testing.models import make_model

    src = make_model(tmp_path / "my-llama", "llama", layers=1)
    args = [
        "--src",
        str(src),
        "--rope-dim",
        "8",
        "--kv-lora-rank",
        "24",
        "--calib-text",
        str(calib_file),
        "--calib-samples",
        "4",
        "--calib-seqlen",
        "32",
    ]
    bad = tmp_path / "bad"
    assert cli_main([*args, "--dst", str(bad), "--base-model", "/home/me/llama"]) == 2
    assert "--base-model '/home/me/llama' is not a Hub model id" in capsys.readouterr().err
    assert not bad.exists()
    dst = tmp_path / "mla"
    assert cli_main([*args, "--dst", str(dst), "--base-model", "acme/llama-7b"]) == 0
    assert (
        json.loads((dst / "config.json").read_text())["transmla"]["base_model"] == "acme/llama-7b"
    )
    meta = metadata_load(dst / "README.md")
    assert meta["base_model"] == "acme/llama-7b"
    assert meta["base_model_relation"] == BASE_MODEL_RELATION
    text = ModelCard.load(dst / "README.md").text
    assert "[acme/llama-7b](https://huggingface.co/acme/llama-7b)" in text
    assert validate_folder(dst) == []
    refresh_model_card(dst)  # a later refresh keeps it
    assert metadata_load(dst / "README.md")["base_model"] == "acme/llama-7b"
