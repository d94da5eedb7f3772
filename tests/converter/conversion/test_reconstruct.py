"""The reconstruction stage (method ``refit-recon``): it lowers the held-out attention error of
every layer below refit's, ends closer to the source model, is deterministic, and leaves an
exact conversion untouched, however its fp32 rounding lands."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from converter.conversion.methods import METHODS, Method
from converter.conversion.pipeline import ConvertOptions, convert
from converter.conversion.reconstruct import EXACT_FLOOR, NOISE_MARGIN, Reconstruct
from transmla_testing.models import make_model

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
# keys exactly representable: rope = head_dim, FreqFold 1, full-rank latent (2 KV heads x 16)
EXACT = dict(rope_dim=16, freqfold=1, kv_lora_rank=32)

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


def _tensors(dst) -> dict[str, torch.Tensor]:
    return load_file(str(dst / "model.safetensors"))


def _attention(tensors: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{layer}.self_attn."
    return {name: t for name, t in tensors.items() if name.startswith(prefix)}


def _logit_error(src, dst, length: int = 64) -> float:
    ids = torch.randint(3, 512, (2, length), generator=torch.Generator().manual_seed(1))
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
    # the closed form the stage starts from is what method refit writes; measured here: layer 0
    # keeps epoch 2 (0.0401 -> 0.0387), layer 1 keeps the closed form
    closed = _tensors(_convert(src, tmp_path / "refit", calib_file, "refit", freqfold=2))
    dst = _convert(src, tmp_path / "fixed", calib_file, "refit-recon", freqfold=2)
    written, stage = _tensors(dst), Reconstruct()
    for i, layer in enumerate(_layers(dst)):
        rec = layer["reconstruction"]
        before, after = rec["held_out_error"]
        ours, theirs = _attention(written, i), _attention(closed, i)
        assert ours.keys() == theirs.keys() and ours, i
        if rec["kept_epoch"]:
            # a kept epoch beat the closed form by min_gain and by more than rounding noise,
            # and it is what was written
            assert before - after >= stage.min_gain * before, (i, rec)
            assert before - after >= NOISE_MARGIN * rec["noise_floor"], (i, rec)
            assert any(not torch.equal(ours[n], theirs[n]) for n in ours), i
        else:  # the closed form kept: written bit for bit
            assert after == before, (i, rec)
            for name in ours:
                assert torch.equal(ours[name], theirs[name]), name


def test_exact_conversion_is_left_as_is(tmp_path, calib_file):
    src = make_model(tmp_path / "src", "qwen2", heads=4, kv_heads=2, head_dim=16, shared_keys=True)
    refit = _tensors(_convert(src, tmp_path / "a", calib_file, "refit", **EXACT))
    dst = _convert(src, tmp_path / "b", calib_file, "refit-recon", **EXACT)
    recon = _tensors(dst)
    for name in refit:
        assert torch.equal(refit[name], recon[name]), name
    assert all("skipped" in layer["reconstruction"] for layer in _layers(dst))


def test_exact_llama_stays_exact_over_repeated_runs(tmp_path, calib_file):
    """The issue's case: a tiny LLaMA with exactly representable keys, converted with the
    default method eight times (model seeds 0-7, one and two torch threads). Each run must find
    every layer exact (its held-out error is rounding: measured 1.7e-13 to 4e-13, 1-2x the
    source's own fp32 noise floor) and match the source's logits like the closed form does
    (about 2e-6; 1.4e-4 would mean trained weights replaced exact ones)."""
    threads = torch.get_num_threads()
    try:
        for run in range(8):
            torch.set_num_threads(1 + run % 2)
            src = make_model(
                tmp_path / f"src{run}", "llama", shared_keys=True, seed=run, rope_scaling=LLAMA3
            )
            dst = _run(
                src, tmp_path / f"dst{run}", calib_file, "refit-recon", calib_samples=8, **EXACT
            )
            for layer in _layers(dst):
                rec = layer["reconstruction"]
                assert "skipped" in rec and rec["kept_epoch"] == 0, (run, rec)
                err0, noise = rec["held_out_error"][0], rec["noise_floor"]
                assert 0 < noise and err0 <= max(EXACT_FLOOR, NOISE_MARGIN * noise), (run, rec)
            assert _logit_error(src, dst, length=200) <= 1e-5, run
    finally:
        torch.set_num_threads(threads)


def test_sharp_attention_rounding_is_not_taken_for_an_error(tmp_path, calib_file):
    """Near-one-hot attention (query/key gain 192): fp32 rounding alone, in the source as in the
    conversion, puts an exact layer's held-out error far above the rounding of a gentle model
    (measured: layer 1 at 1.3e-7, with the source's own fp32-vs-fp64 floor at 3.4e-8). The
    stage must see rounding there, not an error to train away: skipped, closed form kept bit
    for bit. (A fixed threshold at 1e-9 sent that layer to training.)"""
    src = make_model(
        tmp_path / "src",
        "llama",
        shared_keys=True,
        init=(1.0, 192.0, 2.0, 2.0),
        rope_scaling=LLAMA3,
    )
    kw = dict(calib_samples=8, calib_seqlen=128, **EXACT)
    refit = _tensors(_run(src, tmp_path / "a", calib_file, "refit", **kw))
    dst = _run(src, tmp_path / "b", calib_file, "refit-recon", **kw)
    recon = _tensors(dst)
    for name in refit:
        assert torch.equal(refit[name], recon[name]), name
    for layer in _layers(dst):
        assert "skipped" in layer["reconstruction"], layer["reconstruction"]


def test_a_gain_within_rounding_noise_never_replaces_the_closed_form():
    stage = Reconstruct()  # min_gain 1%
    assert stage.real_gain(1e-6, 0.5e-6, noise=1e-10)  # halved, far above the noise
    assert not stage.real_gain(1e-6, 0.5e-6, noise=1e-8)  # halved, but by 50x the floor only
    assert not stage.real_gain(0.1, 0.0995, noise=0.0)  # 0.5%: below min_gain
    assert not stage.real_gain(1e-6, 2e-6, noise=0.0)
