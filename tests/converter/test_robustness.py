"""Bad input, interruption and disk trouble: every failure is one sentence on stderr, a non-zero
exit, no traceback, and nothing next to --dst that looks like a finished checkpoint; problems
visible from the config, the flags or the file headers are refused before calibration starts.

Interruptions are real signals sent to real conversion processes (from outside, or by the
process itself at a chosen point through a small hook script); disk-full is a real EFBIG from
RLIMIT_FSIZE or a real small tmpfs. (Damaged checkpoints refused by a real vLLM engine:
tests/plugin/test_engine_load.py.)
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from converter.checkpoint.writer import check_destination
from converter.cli import main as cli_main
from converter.conversion.settings import resolve_settings
from converter.errors import ConversionError, Interrupted, signals_as_interrupts
from converter.sources.inspection import inspect_source
from transmla_testing.hooked import REPO, run_hooked
from transmla_testing.models import edit_tensors, make_model

SMALL = ("--calib-samples", "2", "--calib-seqlen", "32")
S1, S2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """2-layer untied LLaMA (so lm_head is a tensor of its own)."""
    return make_model(
        tmp_path_factory.mktemp("robust") / "src",
        "llama",
        heads=4,
        kv_heads=2,
        head_dim=16,
        layers=2,
        tied=False,
    )


@pytest.fixture(scope="module")
def sharded(src, tmp_path_factory) -> Path:
    """The same weights in two shards with an index, as hub checkpoints come."""
    out = tmp_path_factory.mktemp("sharded") / "src"
    shutil.copytree(src, out)
    (out / "model.safetensors").unlink()
    state = load_file(src / "model.safetensors")
    names = sorted(state)
    weight_map = {}
    for file, part in ((S1, names[: len(names) // 2]), (S2, names[len(names) // 2 :])):
        save_file({n: state[n] for n in part}, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (out / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def linked_copy(src: Path, dst: Path, **config_changes) -> Path:
    """A folder of symlinks to ``src`` with its own (edited) config.json."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    if config_changes:
        cfg = json.loads((src / "config.json").read_text())
        cfg.update(config_changes)
        (dst / "config.json").unlink()
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def run_in_process(capsys, caplog, *args: str) -> tuple[int, str]:
    """``python -m converter ARGS`` in this process; any exception escaping main() (which is what
    prints a traceback) fails the test by itself."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        rc = cli_main(list(args))
    return rc, capsys.readouterr().err


def assert_refused(rc: int, err: str, caplog, dst: Path, expected: str) -> None:
    assert rc == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and expected in errors[0], err  # one sentence...
    assert "Traceback" not in err  # ...and no traceback
    # refused before any heavy work: calibration never started, no staging folder was made
    assert not any("calibration:" in r.getMessage() for r in caplog.records)
    assert_nothing_left(dst)


def assert_nothing_left(dst: Path) -> None:
    assert not dst.exists()
    if dst.parent.is_dir():
        left = [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]
        assert not left, left


def staging_folders(dst: Path) -> list[Path]:
    """Hidden folders a conversion into ``dst`` works in (.partial-*) or moves a replaced
    checkpoint to (.old-*, only where the atomic exchange rename is unavailable)."""
    return sorted(
        [*dst.parent.glob(f".{dst.name}.partial-*"), *dst.parent.glob(f".{dst.name}.old-*")]
    )


def assert_complete(dst: Path, rope_dim: int | None = None) -> None:
    """A finished checkpoint: every file, readable like any folder, loads, finite logits."""
    umask = os.umask(0)
    os.umask(umask)
    assert dst.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's owner-only 0700
    names = {p.name for p in dst.iterdir()}
    assert {
        "config.json",
        "tokenizer.json",
        "modeling_transmla.py",
        "transmla_report.json",
    } <= names, names
    cfg = json.loads((dst / "config.json").read_text())
    if rope_dim is not None:
        assert cfg["qk_rope_head_dim"] == rope_dim
    model = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32, trust_remote_code=True)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7, 8]])).logits).all()


def cli_args(src: Path, dst: Path, calib: Path, *extra: str) -> list[str]:
    return ["--src", str(src), "--dst", str(dst), "--calib-text", str(calib), *SMALL, *extra]


# ---------------------------------------------------------------------------------------------
# unsupported sources (test_cli.py covers olmo2, deepseek_v3, gpt2, mlp_bias and yarn)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes,expected",
    [
        ({"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}, "q/k RMSNorm"),
        ({"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]}, "sliding-window"),
        (
            {
                "model_type": "mistral",
                "architectures": ["MistralForCausalLM"],
                "sliding_window": 32,
            },
            "sliding window of 32 tokens",
        ),
        (
            {
                "model_type": "qwen2",
                "architectures": ["Qwen2ForCausalLM"],
                "use_sliding_window": True,
                "sliding_window": 32,
            },
            "use_sliding_window=true",
        ),
        (
            {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 32},
            "'sliding_attention'",
        ),
        ({"attn_logit_softcapping": 50.0}, "softcapping"),
        ({"num_local_experts": 8, "num_experts_per_tok": 2}, "mixture-of-experts"),
        ({"attention_bias": True}, "bias on o_proj"),
        ({"use_qk_norm": True}, "q/k RMSNorm"),
        ({"hidden_act": "gelu"}, "SiLU"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
        ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quantized"),
        ({"model_type": "falcon", "architectures": ["FalconForCausalLM"]}, "unknown model_type"),
        # a TransMLA output relabelled as llama is still MLA
        ({"kv_lora_rank": 48, "qk_rope_head_dim": 16}, "already MLA"),
        ({"num_attention_heads": None}, "'num_attention_heads'"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
    ],
)
def test_unsupported_sources_are_refused_before_any_work(
    src, tmp_path, calib_file, capsys, caplog, changes, expected
):
    bad = linked_copy(src, tmp_path / "src", **changes)
    dst = tmp_path / "out"
    rc, err = run_in_process(capsys, caplog, *cli_args(bad, dst, calib_file))
    assert_refused(rc, err, caplog, dst, expected)


QWEN3 = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}


# Qwen3 converts (its q/k norm takes the normed path); what still cannot be served is refused
@pytest.mark.parametrize(
    "changes,expected",
    [
        ({**QWEN3, "use_sliding_window": True, "sliding_window": 32}, "use_sliding_window=true"),
        (
            {**QWEN3, "layer_types": ["full_attention", "sliding_attention"]},
            "'sliding_attention'",
        ),
        ({**QWEN3, "attention_bias": True}, "bias on o_proj"),
        ({**QWEN3, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'"),
    ],
    ids=["sliding-window", "layer-types", "o-proj-bias", "yarn"],
)
def test_qwen3_refusals_keep_their_reasons(
    src, tmp_path, calib_file, capsys, caplog, changes, expected
):
    bad = linked_copy(src, tmp_path / "src", **changes)
    dst = tmp_path / "out"
    rc, err = run_in_process(capsys, caplog, *cli_args(bad, dst, calib_file))
    assert_refused(rc, err, caplog, dst, expected)
    assert "qwen3 model" in err


# ---------------------------------------------------------------------------------------------
# impossible settings (test_cli.py covers rope 6, freqfold 1 with rope 8, rank 0, the clip)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args,expected",
    [
        (["--rope-dim", "32"], "even divisor of head_dim 16 (one of [2, 4, 8, 16])"),
        (["--rope-dim", "8", "--freqfold", "3"], "(one of [2, 4, 8])"),
        (["--freqfold", "two"], "--freqfold must be an integer or 'auto'"),
        (["--kv-lora-rank", "-5"], "--kv-lora-rank -5 must be at least 1"),
        (["--kv-budget", "1.5"], "must be a fraction in (0, 1]"),
        (["--calib-samples", "0"], "--calib-samples 0 must be at least 1"),
        (["--calib-seqlen", "1"], "--calib-seqlen 1 must be at least 2"),
        (["--max-shard-size", "5XB"], "not a size like 5GB"),
        (["--max-shard-size", "0"], "must be positive"),
    ],
)
def test_impossible_settings_are_refused_before_any_work(
    src, tmp_path, calib_file, capsys, caplog, args, expected
):
    dst = tmp_path / "out"
    rc, err = run_in_process(capsys, caplog, *cli_args(src, dst, calib_file), *args)
    assert_refused(rc, err, caplog, dst, expected)


LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 32,
    "intermediate_size": 14336,
    "vocab_size": 128256,
}


@pytest.mark.parametrize(
    "cfg,rope,rank,refused",
    [
        (LLAMA_8B, 64, 512, None),  # the DeepSeek split: every backend
        (LLAMA_8B, 32, 200, None),  # rope padded to 64 at load, latent to 256/512
        (LLAMA_8B, 64, 600, "latent 600 + rope 64 cannot be served as MLA on a GPU"),
        (LLAMA_8B, 128, 384, "rope 128 cannot be served as MLA on a GPU"),  # prefill needs 64
        (LLAMA_8B, 32, 520, "latent 520 + rope 32 cannot be served as MLA on a GPU"),
        ({**LLAMA_8B, "head_dim": 96}, 48, 256, "rope 48 cannot be served as MLA on a GPU"),
    ],
)
def test_gpu_unservable_shapes_are_refused_for_vllm_and_flagged_for_hf(
    caplog, cfg, rope, rank, refused
):
    """Every NVIDIA MLA prefill kernel needs rope 64 (TRITON_MLA included: the attention
    backend flag changes decode only), so --target vllm refuses what no GPU serves, naming what
    would; --target hf converts it with a warning."""
    spec = inspect_source(cfg)
    if refused is None:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="converter.conversion.settings"):
            resolve_settings(spec, rope, rank, None, None)
        assert not [r for r in caplog.records if r.name == "converter.conversion.settings"]
        return
    with pytest.raises(ConversionError) as exc:
        resolve_settings(spec, rope, rank, None, None, target="vllm")
    assert refused in str(exc.value)
    assert "--rope-dim 64" in str(exc.value) and "--target hf" in str(exc.value)
    assert "VLLM_MLA_DISABLE=1" in str(exc.value)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="converter.conversion.settings"):
        resolve_settings(spec, rope, rank, None, None, target="hf")
    notes = [r.getMessage() for r in caplog.records if r.name == "converter.conversion.settings"]
    assert any(refused in n for n in notes), notes


def test_head_dim_above_gpu_prefill_is_flagged(caplog):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="converter.conversion.settings"):
        resolve_settings(inspect_source({**LLAMA_8B, "head_dim": 256}), 64, 448, None, None)
    notes = [r.getMessage() for r in caplog.records if r.name == "converter.conversion.settings"]
    assert any("MLA prefill" in n for n in notes), notes


# ---------------------------------------------------------------------------------------------
# missing or corrupt inputs
# ---------------------------------------------------------------------------------------------
def _drop_config(folder: Path) -> None:
    (folder / "config.json").unlink()


def _list_config(folder: Path) -> None:
    (folder / "config.json").unlink()
    (folder / "config.json").write_text("[1, 2]")


def _drop_weights(folder: Path) -> None:
    for f in folder.glob("model*.safetensors*"):
        f.unlink()


def _drop_tokenizer(folder: Path) -> None:
    for f in folder.glob("tokenizer*"):
        f.unlink()


def _drop_shard(folder: Path) -> None:
    (folder / S2).unlink()


def _stale_index(folder: Path) -> None:
    index = json.loads((folder / INDEX).read_text())
    moved = next(n for n, f in index["weight_map"].items() if f == S2 and "layers.1" in n)
    index["weight_map"][moved] = S1
    (folder / INDEX).unlink()
    (folder / INDEX).write_text(json.dumps(index))


def _truncate_shard(folder: Path) -> None:
    real = (folder / S2).resolve()
    (folder / S2).unlink()
    shutil.copyfile(real, folder / S2)
    os.truncate(folder / S2, (folder / S2).stat().st_size - 4096)  # a download cut short


def _int8_tensor(folder: Path) -> None:
    name = "model.layers.1.mlp.up_proj.weight"
    edit_tensors(
        folder, "model.safetensors", lambda s: s.__setitem__(name, (100 * s[name]).to(torch.int8))
    )


def _fp8_tensor(folder: Path) -> None:
    name = "model.layers.1.self_attn.q_proj.weight"
    edit_tensors(
        folder, "model.safetensors", lambda s: s.__setitem__(name, s[name].to(torch.float8_e4m3fn))
    )


def _wrong_shape(folder: Path) -> None:
    name = "model.layers.1.self_attn.k_proj.weight"
    edit_tensors(folder, "model.safetensors", lambda s: s.__setitem__(name, s[name][:16]))


def _no_lm_head(folder: Path) -> None:
    edit_tensors(folder, "model.safetensors", lambda s: s.pop("lm_head.weight"))


def _o_proj_bias(folder: Path) -> None:
    name = "model.layers.0.self_attn.o_proj.bias"
    edit_tensors(folder, "model.safetensors", lambda s: s.__setitem__(name, torch.zeros(64)))


@pytest.mark.parametrize(
    "damage,sharded_source,expected",
    [
        (_drop_config, False, "has no config.json"),
        (_list_config, False, "holds a JSON list, not an object"),
        (_drop_weights, False, "has no model.safetensors or model.safetensors.index.json"),
        (_drop_tokenizer, False, "has no tokenizer"),
        (_drop_shard, True, f"missing shard(s) {S2}"),
        (_stale_index, True, f"to {S1}, which does not hold them"),
        (_truncate_shard, True, "may be truncated or corrupt"),
        (_int8_tensor, False, "'model.layers.1.mlp.up_proj.weight' has dtype I8"),
        (_fp8_tensor, False, "has dtype F8_E4M3"),
        (
            _wrong_shape,
            False,
            "'model.layers.1.self_attn.k_proj.weight' has shape (16, 64) but "
            "config.json implies (32, 64)",
        ),
        (_no_lm_head, False, "lacks 1 tensor(s) its config.json needs: lm_head.weight"),
        (_o_proj_bias, False, "model.layers.0.self_attn.o_proj.bias"),
    ],
)
def test_missing_or_corrupt_inputs_are_named(
    src, sharded, tmp_path, calib_file, capsys, caplog, damage, sharded_source, expected
):
    bad = linked_copy(sharded if sharded_source else src, tmp_path / "src")
    damage(bad)
    dst = tmp_path / "out"
    rc, err = run_in_process(capsys, caplog, *cli_args(bad, dst, calib_file))
    assert_refused(rc, err, caplog, dst, expected)


@pytest.mark.parametrize(
    "text,expected",
    [
        # 32 text tokens per chunk: this tokenizer adds nothing before text
        ("", "1 tokens found, at least 32 needed"),  # only the document separator
        ("  \n\n \n", "tokens found, at least 32 needed"),
    ],
)
def test_empty_calibration_says_how_many_tokens(src, tmp_path, capsys, caplog, text, expected):
    (tmp_path / "calib.txt").write_text(text)
    dst = tmp_path / "out"
    rc, err = run_in_process(capsys, caplog, *cli_args(src, dst, tmp_path / "calib.txt"))
    assert rc == 2 and expected in err and "Traceback" not in err, err
    assert_nothing_left(dst)


def _digest(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _poison(name: str, value: float, count: int):
    def damage(state: dict) -> None:
        flat = state[name].view(-1)
        flat[torch.arange(count) * 7] = value

    return damage


@pytest.mark.parametrize(
    "name,value,count",
    [
        ("model.layers.1.self_attn.k_proj.weight", float("nan"), 1),  # ran into eigh before
        ("model.layers.0.mlp.down_proj.weight", float("inf"), 3),  # only carried by calibration
        ("lm_head.weight", float("-inf"), 2),  # never touched by calibration: copied
    ],
)
def test_non_finite_source_tensors_are_named_with_their_count(
    src, tmp_path, calib_file, capsys, caplog, name, value, count
):
    bad = linked_copy(src, tmp_path / "src")
    edit_tensors(bad, "model.safetensors", _poison(name, value, count))
    before = _digest(bad)
    dst = tmp_path / "out"
    rc, err = run_in_process(capsys, caplog, *cli_args(bad, dst, calib_file))
    assert rc == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert f"source tensor {name!r}" in errors[0]
    assert f"holds {count:,} non-finite value(s)" in errors[0], errors[0]
    assert_nothing_left(dst)
    assert _digest(bad) == before  # the source is only read


def test_calibration_longer_than_the_context_is_refused(src, tmp_path, calib_file, capsys, caplog):
    dst = tmp_path / "out"  # the tiny model has max_position_embeddings 1024
    args = ["--src", str(src), "--dst", str(dst), "--calib-text", str(calib_file)]
    rc, err = run_in_process(
        capsys, caplog, *args, "--calib-samples", "2", "--calib-seqlen", "2048"
    )
    assert_refused(
        rc, err, caplog, dst, "--calib-seqlen 2048 is longer than the model's context (1024"
    )
    assert "use --calib-seqlen 1024 or less" in err


def test_rope_scaling_that_reaches_further_lets_calibration_go_on(src, caplog):
    from converter.checkpoint.source import read_config
    from converter.conversion.settings import check_calibration_context

    cfg = read_config(src)
    linear = inspect_source({**cfg, "rope_scaling": {"rope_type": "linear", "factor": 4.0}})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="converter.conversion.settings"):
        check_calibration_context(2048, linear)  # 1024 x 4 = 4096 positions: goes on
    assert any("extends the context to 4096 tokens" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConversionError, match="4096 with its rope scaling"):
        check_calibration_context(8192, linear)


@pytest.fixture(scope="module")
def converted_src(src, tmp_path_factory, calib_file) -> Path:
    dst = tmp_path_factory.mktemp("verify") / "mla"
    assert cli_main(cli_args(src, dst, calib_file, "--rope-dim", "8", "--kv-lora-rank", "24")) == 0
    return dst


def test_verify_refuses_a_source_that_is_not_the_one_converted(
    src, converted_src, tmp_path, calib_file, capsys
):
    """Another vocabulary, another shape, or the same shape from another seed are refused
    before any forward pass; a moved copy of the right source still verifies."""
    other_vocab = make_model(
        tmp_path / "vocab",
        "llama",
        heads=4,
        kv_heads=2,
        head_dim=16,
        layers=2,
        tied=False,
        vocab_size=600,
    )
    other_seed = make_model(
        tmp_path / "seed", "llama", heads=4, kv_heads=2, head_dim=16, layers=2, tied=False, seed=5
    )
    text = ["--text", str(calib_file), "--ctx", "32", "--max-tokens", "64"]
    for other, expected in (
        (other_vocab, "do not belong together (vocabulary 600 vs 512"),
        (other_seed, "is not the model --dst"),
    ):
        before = _digest(converted_src)
        rc = cli_main(["verify", "--src", str(other), "--dst", str(converted_src), *text])
        err = capsys.readouterr().err
        assert rc == 2 and expected in err and "Traceback" not in err, err
        assert len([x for x in err.splitlines() if x.startswith("error")]) == 1, err
        assert _digest(converted_src) == before
    moved = tmp_path / "moved-elsewhere" / "renamed"
    shutil.copytree(src, moved)
    assert cli_main(["verify", "--src", str(moved), "--dst", str(converted_src), *text]) == 0
    assert "PPL source" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# destination
# ---------------------------------------------------------------------------------------------
def test_destination_problems_are_refused_before_any_work(
    src, tmp_path, calib_file, capsys, caplog
):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for dst, extra, expected in (
        (afile / "out", (), f"{afile} is a file, not a folder"),  # parent is a file
        (afile, ("--overwrite",), "is a file, not a folder"),  # never replace a file
        (src, ("--overwrite",), "overlaps --src"),  # would replace the source
        (src / "mla", (), "is inside --src"),  # would write a model into the source
    ):
        rc, err = run_in_process(capsys, caplog, *cli_args(src, dst, calib_file), *extra)
        assert rc == 2 and expected in err and "Traceback" not in err, err
        assert not any("calibration:" in r.getMessage() for r in caplog.records)
    assert afile.read_text() == "not a folder"
    assert (src / "model.safetensors").is_file() and (src / "config.json").is_file()
    assert not (src / "mla").exists()


def _mount_tmpfs(folder: Path, options: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True
    )
    return proc.returncode == 0


def _umount(folder: Path) -> None:
    subprocess.run(["umount", str(folder)], capture_output=True)


def test_read_only_destination_is_refused(src, tmp_path, calib_file, capsys, caplog):
    ro = tmp_path / "ro"
    if not _mount_tmpfs(ro, "ro,size=64k"):
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        rc, err = run_in_process(capsys, caplog, *cli_args(src, ro / "out", calib_file))
    finally:
        _umount(ro)
    assert_refused(
        rc,
        err,
        caplog,
        ro / "out",
        "is not writable by this user (or is on a read-only file system)",
    )


def test_too_small_disk_is_refused_before_the_layers(src, tmp_path, calib_file, capsys, caplog):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "size=256k"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        rc, err = run_in_process(capsys, caplog, *cli_args(src, disk / "out", calib_file))
        left = sorted(p.name for p in disk.iterdir())
    finally:
        _umount(disk)
    assert rc == 2 and "Traceback" not in err, err
    assert (
        re.search(
            r"the converted weights need [\d.]+ MB but only [\d.]+ MB is free on the "
            "disk of",
            err,
        )
        and "choose another --dst" in err
    ), err
    assert not any("layer 0:" in r.getMessage() for r in caplog.records)
    assert left == []


# ---------------------------------------------------------------------------------------------
# interruption and disk full in a real conversion process
# ---------------------------------------------------------------------------------------------
def signal_when_converting(args: list[str], sig: int, delay: float = 0.0):
    """Start a real conversion, wait for its progress bar to appear, send ``sig``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "converter", *args],
        cwd=REPO,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    seen = b""
    deadline = time.time() + 240
    while b"converting layers" not in seen and time.time() < deadline:
        chunk = os.read(proc.stderr.fileno(), 65536)
        if not chunk:
            break
        seen += chunk
    assert b"converting layers" in seen, seen.decode()[-2000:]
    time.sleep(delay)
    proc.send_signal(sig)
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    return proc.returncode, (seen + rest).decode()


def test_sigkill_leaves_dst_absent_or_complete_and_the_next_run_cleans_up(
    src, tmp_path, calib_file
):
    dst = tmp_path / "out"
    args = cli_args(src, dst, calib_file)
    previous: Path | None = None

    def check_killed(returncode: int, stderr: str) -> None:
        nonlocal previous
        assert returncode == -signal.SIGKILL, stderr[-2000:]
        assert not dst.exists()
        stale = staging_folders(dst)  # uncatchable: it left its hidden staging folder...
        assert len(stale) == 1 and stale[0] != previous, stale
        if previous is not None:  # ...and removed the one the run before had left, saying so
            pid = previous.name.split("partial-")[1].split("@")[0]
            assert (
                f"removed {previous}, left by an interrupted conversion (process {pid} is "
                "gone)" in stderr
            ), stderr[-3000:]
        previous = stale[0]

    # once the progress bar is up, in the middle of the layers (layer 1 of 2), while finishing
    check_killed(*signal_when_converting(args, signal.SIGKILL))
    for point in ("write:14", "copy"):
        proc = run_hooked(tmp_path, point, "SIGKILL", args)
        check_killed(proc.returncode, proc.stderr)

    # killed right after the folder was moved into place: DST is complete, and this run too
    # removed the staging folder the last killed one had left
    proc = run_hooked(tmp_path, "published", "SIGKILL", args)
    assert proc.returncode == -signal.SIGKILL
    assert f"removed {previous}" in proc.stderr
    assert staging_folders(dst) == []
    assert_complete(dst, rope_dim=16)

    # the same with --overwrite: DST is the new, complete checkpoint; the replaced one sits in a
    # staging folder the next run removes
    proc = run_hooked(tmp_path, "published", "SIGKILL", [*args, "--overwrite", "--rope-dim", "8"])
    assert proc.returncode == -signal.SIGKILL
    assert_complete(dst, rope_dim=8)
    assert len(staging_folders(dst)) == 1
    check_destination(dst, overwrite=True)
    assert staging_folders(dst) == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "hooked_convert.py") == ["out"]
    assert_complete(dst, rope_dim=8)


def test_sigint_and_sigterm_remove_the_partial_output(src, tmp_path, calib_file):
    dst = tmp_path / "out"
    args = cli_args(src, dst, calib_file)
    proc = run_hooked(tmp_path, "write:14", "SIGINT", args)  # Ctrl-C in the middle of layer 1
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "interrupted (SIGINT): nothing was written to --dst (partial output removed)"
    )
    assert "Traceback" not in proc.stderr
    assert_nothing_left(dst)

    rc, err = signal_when_converting(args, signal.SIGTERM)  # kill, systemd, docker
    assert rc == 128 + signal.SIGTERM, err[-2000:]
    assert "interrupted (SIGTERM): nothing was written" in err and "Traceback" not in err
    assert_nothing_left(dst)

    # an interrupt while the finished folder is moved into place waits for the move
    proc = run_hooked(tmp_path, "published", "SIGINT", args)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert f"after {dst} was complete; it is kept" in proc.stderr
    assert staging_folders(dst) == []
    assert_complete(dst, rope_dim=16)


def test_an_error_raised_after_a_signal_is_reported_as_the_signal():
    """The handler's exception can land in native code that raises its own error instead (seen
    in CI: SIGTERM inside safetensors' get_tensor came back as that reader's error, reported as
    a truncated file); the CLI still reports the signal. Without a signal, errors pass as they
    are, and the handlers in place before are restored either way.
    """
    before = signal.getsignal(signal.SIGTERM)

    def native_read():
        try:
            signal.raise_signal(signal.SIGTERM)
        except Interrupted:
            raise TypeError("could not determine the shape of object type UntypedStorage") from None

    with pytest.raises(Interrupted) as caught, signals_as_interrupts():
        native_read()
    assert caught.value.signum == signal.SIGTERM
    assert isinstance(caught.value.__cause__, TypeError)
    assert signal.getsignal(signal.SIGTERM) is before

    with pytest.raises(ConversionError, match="bad input"), signals_as_interrupts():
        raise ConversionError("bad input")
    assert signal.getsignal(signal.SIGTERM) is before


def test_disk_full_while_writing_cleans_up(src, tmp_path, calib_file):
    dst = tmp_path / "out"
    args = cli_args(src, dst, calib_file)
    proc = run_hooked(tmp_path, "write:14", "full", args)  # every later write fails: EFBIG
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: ran out of space writing {dst}: File too large"), last
    assert "free some space or choose another --dst" in last and "Traceback" not in proc.stderr
    assert_nothing_left(dst)

    def limit():  # the whole process under a 100 kB file size limit: the first shard fails
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))

    proc = subprocess.run(
        [sys.executable, "-m", "converter", *cli_args(src, dst, calib_file)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
    )
    assert proc.returncode == 2 and "ran out of space" in proc.stderr, proc.stderr[-2000:]
    assert_nothing_left(dst)
