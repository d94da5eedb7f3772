"""The reconstruction stage (method ``refit-recon``): it lowers the held-out attention error of
every layer below refit's, ends closer to the source model, is deterministic, and leaves an
exact conversion untouched."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from converter.conversion.methods import METHODS, Method
from converter.conversion.pipeline import ConvertOptions, convert
from converter.conversion.reconstruct import Reconstruct
from transmla_testing.models import make_model

# the default schedule (one epoch, >= 24 steps) is sized for real calibration sets; a tiny model
# with 42 training chunks of 64 tokens needs more steps to show its effect in every layer
LONGER = Method(
    "refit-recon",
    "source",
    (*METHODS["refit"].stages, Reconstruct(epochs=6, lr=2e-2)),
)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    # Qwen2: q/k/v biases, so the kv_a and q biases are trained too; gentle weights keep the
    # error in the regime where the layer-wise error tracks the logits
    return make_model(
        tmp_path_factory.mktemp("recon") / "src",
        "qwen2",
        heads=4,
        kv_heads=2,
        head_dim=16,
        seed=7,
        init=(0.1, 0.6, 0.6, 0.6),
    )


def _convert(src, dst, calib_file, method, longer=False, **kw):
    with pytest.MonkeyPatch.context() as mp:
        if longer:
            mp.setitem(METHODS, method, LONGER)
        return _run(src, dst, calib_file, method, **kw)


def _run(src, dst, calib_file, method, **kw):
    opts = dict(rope_dim=8, kv_lora_rank=16, freqfold="auto", calib_samples=48, calib_seqlen=64)
    opts.update(kw)
    return convert(
        ConvertOptions(
            src=str(src), dst=str(dst), calib_text=str(calib_file), method=method, **opts
        )
    )


def _layers(dst) -> list[dict]:
    return json.loads((dst / "transmla_report.json").read_text())["layers"]


def _logit_error(src, dst) -> float:
    ids = torch.randint(3, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits
        mla = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32, trust_remote_code=True)
        return float((mla(ids).logits - want).norm() / want.norm())


@pytest.fixture(scope="module")
def pair(src, tmp_path_factory, calib_file):
    root = tmp_path_factory.mktemp("pair")
    return (
        _convert(src, root / "refit", calib_file, "refit"),
        _convert(src, root / "recon", calib_file, "refit-recon", longer=True),
    )


def test_held_out_error_falls_below_refit_in_every_layer(pair):
    for layer in _layers(pair[1]):
        before, after = layer["reconstruction"]["held_out_error"]  # before: refit's weights
        assert after < 0.9 * before, layer


def test_ends_closer_to_the_source_than_refit(src, pair):
    refit, recon = (_logit_error(src, d) for d in pair)
    assert recon < refit, (recon, refit)


def test_same_seed_gives_bit_identical_tensors(src, pair, tmp_path, calib_file):
    again = _convert(src, tmp_path / "again", calib_file, "refit-recon", longer=True)
    first, second = (
        load_file(str(pair[1] / "model.safetensors")),
        load_file(str(again / "model.safetensors")),
    )
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_without_held_out_chunks_it_holds_out_training_chunks(src, tmp_path, calib_file):
    dst = _convert(src, tmp_path / "fixed", calib_file, "refit-recon", freqfold=2)
    for layer in _layers(dst):
        before, after = layer["reconstruction"]["held_out_error"]
        assert after <= before


def test_exact_conversion_is_left_as_is(tmp_path, calib_file):
    src = make_model(tmp_path / "src", "qwen2", heads=4, kv_heads=2, head_dim=16, shared_keys=True)
    kw = dict(rope_dim=16, freqfold=1, kv_lora_rank=32)
    refit = load_file(
        str(_convert(src, tmp_path / "a", calib_file, "refit", **kw) / "model.safetensors")
    )
    dst = _convert(src, tmp_path / "b", calib_file, "refit-recon", **kw)
    recon = load_file(str(dst / "model.safetensors"))
    for name in refit:
        assert torch.equal(refit[name], recon[name]), name
    assert all("skipped" in layer["reconstruction"] for layer in _layers(dst))
