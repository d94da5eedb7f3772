"""``python -m converter inspect``: KV bytes and capacity, checked against hand arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from converter.conversion.pipeline import ConvertOptions, convert
from converter.errors import ConversionError
from converter.measure.kv_cache import format_table, kv_budget, parse_memory
from transmla_testing.models import make_model

MIB = 2**20


def rows(budget) -> dict[str, dict]:
    return {r["name"]: r for r in budget["rows"]}


def write_config(folder: Path, **cfg) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


LLAMA3_8B_ATTN = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    hidden_size=4096,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    num_hidden_layers=32,
    intermediate_size=14336,
    vocab_size=128256,
    rope_theta=500000.0,
    torch_dtype="bfloat16",
)


@pytest.fixture(scope="module")
def tiny_converted(tmp_path_factory, calib_file) -> Path:
    """Source: 2 layers, 2 KV heads x head_dim 16 -> 64 elements; converted latent 24 + rope 8."""
    root = tmp_path_factory.mktemp("inspect")
    src = make_model(root / "src", "llama", hidden=64, heads=4, kv_heads=2, head_dim=16, layers=2)
    return convert(
        ConvertOptions(
            src=str(src),
            dst=str(root / "mla"),
            rope_dim=8,
            kv_lora_rank=24,
            calib_text=str(calib_file),
            calib_samples=4,
            calib_seqlen=32,
        )
    )


def test_llama3_8b_source_preview(tmp_path):
    folder = write_config(tmp_path / "llama3", **LLAMA3_8B_ATTN)
    got = rows(kv_budget(folder, kv_memory=8 * 2**30, context=4096).to_dict())
    # by hand: 2 x 8 x 128 = 2048 elements x 2 B x 32 layers = 131072 B per token
    assert got["original"]["elements_per_token_per_layer"] == 2048
    assert got["original"]["bytes_per_token"] == 131072
    assert got["original"]["tokens"] == 8 * 2**30 // 131072 == 65536
    assert got["original"]["requests"] == 16
    # converted 512 + 64 = 576 elements x 2 B x 32 layers = 36864 B per token
    for name in (
        "converted",
        "CPU_MLA",
        "FLASHMLA",
        "FLASH_ATTN_MLA",
        "FLASHINFER_MLA",
        "TRITON_MLA",
    ):
        assert got[name]["bytes_per_token"] == 36864, name
        assert got[name]["tokens"] == 8 * 2**30 // 36864 == 233016
        assert got[name]["requests"] == 56
        assert got[name]["capacity_vs_original"] == pytest.approx(2048 / 576, abs=1e-4)


def test_llama3_8b_fp8_columns(tmp_path):
    folder = write_config(tmp_path / "llama3", **LLAMA3_8B_ATTN)
    budget = kv_budget(folder, kv_memory=8 * 2**30, context=4096)
    got = rows(budget.to_dict())
    # by hand: 576 elements x 1 B x 32 layers = 18432 B per token; 4096 / 576 = 7.11x the bf16
    # GQA cache (the figure)
    for name in ("FLASHMLA", "FLASHINFER_MLA", "TRITON_MLA"):
        assert got[name]["fp8_tokens"] == 8 * 2**30 // 18432 == 466033, name
        assert got[name]["fp8_requests"] == 113
        assert got[name]["fp8_capacity_vs_original"] == round(4096 / 576, 4) == 7.1111
        assert got[name]["fp8"].startswith("fp8 on")
    assert "not A100 / A10" in got["TRITON_MLA"]["fp8"]
    for name in ("FLASH_ATTN_MLA", "CPU_MLA"):  # no fp8 cache on these: nothing to count
        assert got[name]["fp8"] == "no fp8" and got[name]["fp8_tokens"] is None
    text = format_table(budget)
    assert "466,033" in text and "7.11x" in text and "not A100 / A10" in text


def test_source_preview_with_rope_not_dividing_64(tmp_path):
    # head_dim 96, rope 96: fixed-split kernels (512 + 64) cannot hold a 96-dim rope key, and
    # no GPU prefill kernel takes it either (they need rope 64), so TRITON_MLA cannot serve it.
    folder = write_config(
        tmp_path / "m",
        **{**LLAMA3_8B_ATTN, "head_dim": 96, "num_key_value_heads": 1, "num_hidden_layers": 3},
    )
    b = kv_budget(folder, dtype="float32", kv_memory=MIB, context=64, rope_dim=96, kv_lora_rank=64)
    got = rows(b.to_dict())
    assert got["original"]["elements_per_token_per_layer"] == 192
    assert got["original"]["tokens"] == MIB // (192 * 4 * 3) == 455
    assert got["converted"]["elements_per_token_per_layer"] == 64 + 96
    for name in ("CPU_MLA", "FLASHMLA", "FLASH_ATTN_MLA", "FLASHINFER_MLA", "TRITON_MLA"):
        assert got[name]["elements_per_token_per_layer"] is None
        assert got[name]["tokens"] is None


def test_rope_32_is_padded_to_64_on_every_gpu_backend(tmp_path):
    # latent 288 + rope 32 = 320 in the checkpoint; every GPU prefill needs rope 64, so
    # TRITON_MLA serves 288 + 64 rounded up to a head size: 448 + 64 = 512, not 320.
    folder = write_config(tmp_path / "m", **LLAMA3_8B_ATTN)
    got = rows(
        kv_budget(
            folder, dtype="bfloat16", kv_memory=MIB, context=64, rope_dim=32, kv_lora_rank=288
        ).to_dict()
    )
    assert got["converted"]["elements_per_token_per_layer"] == 320
    assert got["TRITON_MLA"]["elements_per_token_per_layer"] == 512
    assert got["TRITON_MLA"]["label"].endswith("448 + 64")
    assert "zero-padded to 64" in got["TRITON_MLA"]["note"]
    for name in ("CPU_MLA", "FLASHMLA", "FLASH_ATTN_MLA", "FLASHINFER_MLA"):
        assert got[name]["elements_per_token_per_layer"] == 576, name
        assert got[name]["label"].endswith("512 + 64")


def test_converted_checkpoint_against_hand_computation(tiny_converted):
    b = kv_budget(tiny_converted, dtype="bfloat16", kv_memory=MIB, context=100).to_dict()
    assert (b["kind"], b["layers"], b["bytes_per_element"]) == ("converted", 2, 2)
    got = rows(b)
    # original (from the transmla block): 2 x 2 KV heads x 16 = 64 elements, 128 B per layer,
    # 256 B per token over 2 layers -> 1 MiB / 256 = 4096 tokens, 40 requests of 100.
    assert got["original"]["elements_per_token_per_layer"] == 64
    assert got["original"]["bytes_per_token_per_layer"] == 128
    assert (got["original"]["tokens"], got["original"]["requests"]) == (4096, 40)
    # checkpoint: 24 + 8 = 32 elements -> 128 B per token -> 8192 tokens, 81 requests, 2x.
    assert got["converted"]["bytes_per_token"] == 128
    assert (got["converted"]["tokens"], got["converted"]["requests"]) == (8192, 81)
    assert got["converted"]["capacity_vs_original"] == 2.0
    # CPU / FlashMLA: padded to 512 + 64 = 576 -> 2304 B per token -> 455 tokens, 4 requests.
    for name in ("CPU_MLA", "FLASHMLA", "FLASH_ATTN_MLA", "FLASHINFER_MLA"):
        assert got[name]["elements_per_token_per_layer"] == 576
        assert (got[name]["tokens"], got[name]["requests"]) == (455, 4)
        assert got[name]["capacity_vs_original"] == pytest.approx(64 / 576, abs=1e-4)
    # TRITON_MLA: smallest accepted size >= 32 is 320 -> 1280 B per token -> 819 tokens.
    assert got["TRITON_MLA"]["elements_per_token_per_layer"] == 320
    assert (got["TRITON_MLA"]["tokens"], got["TRITON_MLA"]["requests"]) == (819, 8)
    # the served dtype defaults to the checkpoint's (float32 here): twice the bytes.
    default = rows(kv_budget(tiny_converted, kv_memory=MIB, context=100).to_dict())
    assert default["original"]["bytes_per_token"] == 512


def test_cli_json_and_table(tiny_converted):
    cmd = [
        sys.executable,
        "-m",
        "converter",
        "inspect",
        str(tiny_converted),
        "--dtype",
        "bfloat16",
        "--kv-memory",
        "1MiB",
        "--context",
        "100",
    ]
    proc = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["kv_memory_bytes"] == MIB and data["context"] == 100
    assert rows(data)["CPU_MLA"]["tokens"] == 455
    assert rows(data)["original"]["tokens"] == 4096
    table = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    assert "served on CPU_MLA: 512 + 64" in table.stdout and "4,096" in table.stdout


def test_cli_user_errors(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "converter", "inspect", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "no config.json" in proc.stderr
    assert "Traceback" not in proc.stderr
    with pytest.raises(ConversionError, match="8 parsecs"):
        parse_memory("8 parsecs")
    assert parse_memory("8GiB") == 8 * 2**30 and parse_memory("1.5GB") == 1_500_000_000


# Qwen3-30B-A3B's attention and MoE fields (config only): 4 KV heads x 128, 48 layers
QWEN3_MOE_30B = dict(
    model_type="qwen3_moe",
    architectures=["Qwen3MoeForCausalLM"],
    hidden_size=2048,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    num_hidden_layers=48,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    vocab_size=151936,
    rope_theta=1000000.0,
    torch_dtype="bfloat16",
)


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_qwen3_sources_preview_the_same_cache_with_their_qk_norm(tmp_path, family):
    cfg = dict(QWEN3_MOE_30B)
    if family == "qwen3":
        cfg.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"])
        for key in ("moe_intermediate_size", "num_experts", "num_experts_per_tok"):
            del cfg[key]
    budget = kv_budget(write_config(tmp_path / family, **cfg)).to_dict()
    got = rows(budget)
    # 2 x 4 x 128 = 1024 elements per token and layer; the default conversion keeps 512 + 64
    assert got["original"]["elements_per_token_per_layer"] == 1024
    assert got["converted"]["elements_per_token_per_layer"] == 576
    assert got["converted"]["label"] == "if converted: latent 512 + rope 64 (q/k norm kept)"
    assert budget["architecture"] == cfg["architectures"][0]
