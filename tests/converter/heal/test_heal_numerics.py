"""heal on models that break naive training numerics, each built to show one failure:

- a first position whose activations make bf16 and fp32 forwards disagree: the precision check
  catches it and the run trains in fp32;
- a Qwen2.5-like model (q/k biases near 100, a latent 512x smaller than its query, so the
  conversion folds fp8 scales of 2^8-2^9 into it): heal converges, and the written fp8 scales
  and ranges describe the healed weights;
- a run made to diverge stops by itself and keeps its best weights;
- a heal that improves validation but worsens the test rows writes the input's weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from converter.conversion.pipeline import ConvertOptions, convert
from converter.heal.objective import logits
from converter.heal.precision import check_precision
from converter.math.fp8_scales import Fp8Scales, apply_fp8_scales
from transmla_testing.hooked import run_cli
from transmla_testing.models import make_model, read_tensors, teach
from transmla_testing.text import play_text
from transmla_vllm.checkpoint_format import layer_prefix

SEQLEN = 64
HEAL = ["--seqlen", str(SEQLEN), "--batch-size", "8", "--eval-tokens", "1024"]


def tiny_lm(
    folder: Path, text: str, family: str = "llama", edit=None, steps: int = 150, **kw
) -> Path:
    make_model(folder, family, hidden=64, heads=4, kv_heads=2, head_dim=16, seed=5, **kw)
    return teach(folder, text, steps, edit)


def small_conversion(src: Path, dst: Path, calib_file: Path) -> Path:
    return convert(
        ConvertOptions(
            src=str(src),
            dst=str(dst),
            rope_dim=8,
            kv_lora_rank=16,
            calib_text=str(calib_file),
            calib_samples=32,
            calib_seqlen=SEQLEN,
        )
    )


def heal_cli(teacher: Path, student: Path, dst: Path, text: Path, tokens: int, *flags: str):
    return run_cli(
        [
            "heal",
            *("--teacher", str(teacher), "--student", str(student), "--dst", str(dst)),
            *("--tokens", str(tokens), "--calib-text", str(text), *HEAL, *flags),
        ]
    )


def loud_first_position(model, when: str) -> None:
    """The row's first token (<s>, which this tokenizer adds) sits alone in dimension 0 of the
    embeddings, which every layer's input norm multiplies by 300 and no key reads (trained
    without dimension 0, so the model is an ordinary one on every other position): its values
    are ~300x everyone else's, and each position's output carries a large term p(<s>) v(<s>)
    that bf16 rounds (p and v each to 8 bits) by more than the rest of the signal."""
    with torch.no_grad():
        e = model.model.embed_tokens.weight
        if when == "before":
            e[:, 0] = 0
            for layer in model.model.layers:
                layer.self_attn.k_proj.weight[:, 0] = 0
            return
        e[1] = 0
        e[1, 0] = 1.0
        for layer in model.model.layers:
            layer.input_layernorm.weight[0] = 300.0
            layer.self_attn.k_proj.weight[:, 0] = 0


@pytest.fixture(scope="module")
def loud(tmp_path_factory, calib_file) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("loud")
    src = tiny_lm(root / "src", calib_file.read_text(), edit=loud_first_position, bos="added")
    return src, small_conversion(src, root / "mla", calib_file)


def test_precision_check_catches_a_model_bf16_cannot_run(loud, calib_file):
    src, student = loud
    teacher = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    from converter.remote_code.modeling_transmla import TransMLAForCausalLM

    conv = TransMLAForCausalLM.from_pretrained(student, dtype=torch.float32)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    ids = tok(play_text("twelfth-night")[:4000])["input_ids"]
    rows = torch.tensor(ids[: 2 * SEQLEN]).view(2, SEQLEN)
    assert rows[0, 0] == rows[1, 0] or rows[0, 0] == tok.bos_token_id
    rows[:, 0] = tok.bos_token_id  # every row starts with <s>, as this tokenizer starts text
    check = check_precision(teacher, conv, rows, "cpu")
    # independent: the teacher's own logits in both precisions
    with torch.no_grad():
        t32, t16 = (logits(teacher, rows, "cpu", p).log_softmax(-1) for p in ("fp32", "bf16"))
    gap = float((t32.exp() * (t32 - t16)).sum(-1).mean())
    assert check.teacher_gap == pytest.approx(gap, rel=1e-5)
    assert check.teacher_gap > check.limit and check.precision == "fp32"
    # the same model without the loud first position: bf16 is fine
    plain = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        for layer in plain.model.layers:
            layer.input_layernorm.weight[0] = 1.0
    quiet = check_precision(plain, conv, rows, "cpu")
    assert quiet.teacher_gap < gap / 100 and quiet.teacher_gap < quiet.limit


def test_heal_trains_in_fp32_when_bf16_disagrees(loud, tmp_path, calib_file):
    src, student = loud
    proc = heal_cli(src, student, tmp_path / "out", calib_file, 1024, "--precision", "bf16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bf16 would train against another model" in proc.stderr
    assert "training in fp32 on cpu" in proc.stderr
    heal = json.loads((tmp_path / "out" / "transmla_report.json").read_text())["heal"]
    assert heal["settings"]["precision"] == heal["precision_check"]["precision"] == "fp32"


def qwen25_like(model, when: str) -> None:
    """Before training: key biases of 100 and query biases of 10 in two low-frequency dims of
    every head, as Qwen2.5 carries. After: keys and values x 2^-9, queries and o_proj x 2^9 (the
    same function), so the latent is ~2^9 smaller than the absorbed query and the conversion's
    fp8 stage folds scales of 2^7-2^9 into it."""
    head_dim = 16
    with torch.no_grad():
        for layer in model.model.layers:
            a = layer.self_attn
            if when == "before":
                for h in range(a.k_proj.bias.shape[0] // head_dim):
                    for d in (head_dim // 2 - 1, head_dim - 1):
                        a.k_proj.bias[h * head_dim + d] = 100.0
                for h in range(a.q_proj.bias.shape[0] // head_dim):
                    for d in (head_dim // 2 - 1, head_dim - 1):
                        a.q_proj.bias[h * head_dim + d] = 10.0
            else:
                g = 2.0**-9
                for t in (a.k_proj.weight, a.k_proj.bias, a.v_proj.weight, a.v_proj.bias):
                    t.mul_(g)
                for t in (a.q_proj.weight, a.q_proj.bias, a.o_proj.weight):
                    t.div_(g)


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory, calib_file) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("qwen25")
    text = calib_file.read_text()
    src = tiny_lm(root / "src", text, "qwen2", qwen25_like, 400, bos="none", tied=False)
    return src, small_conversion(src, root / "mla", calib_file)


def test_heal_converges_on_large_biases_and_fp8_scales(qwen25, tmp_path, calib_file):
    src, student = qwen25
    before = json.loads((student / "transmla_report.json").read_text())
    largest = max(max(layer["fp8_scales"]["latent_log2"]) for layer in before["layers"])
    assert largest >= 7  # the construction works: the latent carries large fp8 scales
    dst = tmp_path / "healed"
    proc = heal_cli(src, student, dst, calib_file, 16384, "--precision", "fp32", "--lr", "1e-2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"fp8 cache scales taken out for training (largest 2^{largest})" in proc.stderr
    report = json.loads((dst / "transmla_report.json").read_text())
    heal = report["heal"]
    history = heal["history"]
    # converges: no guard event, validation KL lower at the end than at the start, the training
    # KL never far above where it started (with the absolute AdamW steps heal took before, the
    # same construction's training KL went 0.10 -> 0.69 within 4 steps and its validation PPL
    # 38 -> 102), and the test rows better
    assert heal["guard_events"] == [] and not heal["stopped_early"]
    assert history[-1]["validation_kl"] < 0.95 * history[0]["validation_kl"]
    assert max(h["train_kl"] for h in history[1:]) < 1.5 * history[0]["validation_kl"]
    test = heal["test"]["ppl"]
    assert heal["kept"] == "healed" and test["teacher"] < test["after"] < test["before"]
    # the scales were chosen again on the healed weights, and the report's ranges are those of
    # the written weights: unfolding the written scales gives weights whose cache values, when
    # folded again, sit where the report says
    written = read_tensors(dst)
    model = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32, trust_remote_code=True)
    from converter.conversion.fp8_scaling import cache_maxima

    inputs: dict[int, list] = {}
    hooks = [
        layer.self_attn.register_forward_pre_hook(
            lambda m, a, i=i: inputs.setdefault(i, []).append(a[0])
        )
        for i, layer in enumerate(model.model.layers)
    ]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)  # heal cuts its rows with the teacher's tokenizer
    ids = tok(calib_file.read_text(), add_special_tokens=False)["input_ids"]  # heal: train rows
    with torch.no_grad():
        for i in range(0, 256 * SEQLEN, SEQLEN):
            model.model(input_ids=torch.tensor([ids[i : i + SEQLEN]]))
    for h in hooks:
        h.remove()
    for i, layer in enumerate(report["layers"]):
        entry = layer["fp8_scales"]
        assert entry["chosen"].startswith("after heal")
        seen = cache_maxima(model.model.layers[i].self_attn, inputs[i])
        assert float(seen.latent.max()) == pytest.approx(entry["max_after"]["latent"], rel=1e-4)
        # folding the written scales out gives the same layer whatever they are (exact)
        prefix = layer_prefix(i)
        attn = {n.removeprefix(prefix): t for n, t in written.items() if n.startswith(prefix)}
        scales = Fp8Scales(entry["latent_log2"], entry["rope_pair_log2"])
        dims = (model.model.layers[i].self_attn.num_heads, model.model.layers[i].self_attn.nope_dim)
        back = apply_fp8_scales(apply_fp8_scales(attn, scales, *dims, inverse=True), scales, *dims)
        for name, t in back.items():
            assert t.equal(attn[name]), name


def test_a_run_made_to_diverge_stops_and_keeps_its_best(qwen25, tmp_path, calib_file):
    src, student = qwen25
    dst = tmp_path / "healed"
    # a rate 300x the working one: every run of it diverges
    proc = heal_cli(src, student, dst, calib_file, 16384, "--precision", "fp32", "--lr", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    heal = json.loads((dst / "transmla_report.json").read_text())["heal"]
    events = heal["guard_events"]
    assert len(events) == 4 and heal["stopped_early"]
    assert "the run is diverging" in proc.stderr and "heal stopped at step" in proc.stderr
    assert [e["action"].split(",")[0] for e in events[:3]] == ["back to step 0"] * 3
    assert all(e["median_train_kl"] > 4 * e["start_kl"] for e in events)
    # it stopped well before the end, and what it wrote is not worse than what it was given
    assert heal["history"][-1]["step"] < heal["settings"]["steps"]
    assert heal["test"]["ppl"]["after"] <= heal["test"]["ppl"]["before"]
    if heal["kept"] == "input":
        want, got = read_tensors(student), read_tensors(dst)
        assert all(got[k].equal(want[k]) for k in want)


def test_a_heal_worse_on_the_test_rows_writes_the_input(tmp_path, calib_file):
    """The teacher knows only the comedies, the student's source only Hamlet; validation rows
    are comedy (distilling every weight improves them), test rows are Hamlet (distilling
    unlearns it)."""
    hamlet = play_text("hamlet", "tragedies")
    comedies = calib_file.read_text()
    teacher = tiny_lm(tmp_path / "teacher", comedies)
    other = tiny_lm(tmp_path / "other", hamlet)
    student = small_conversion(other, tmp_path / "mla", calib_file)
    held = tmp_path / "held.txt"
    held.write_text(hamlet[:1900] + "\n\n" + comedies[-12000:])  # ~1090 tokens of Hamlet
    for flags, kept in (((), "input"), (("--keep-worse",), "healed")):
        dst = tmp_path / f"out-{kept}"
        proc = heal_cli(
            teacher, student, dst, calib_file, 8192, "--eval-text", str(held), "--lr", "1e-2",
            "--precision", "fp32", "--train", "all", *flags,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        heal = json.loads((dst / "transmla_report.json").read_text())["heal"]
        test, validation = heal["test"]["ppl"], heal["validation"]["ppl"]
        # the construction works: the teacher is the better model on the validation rows, the
        # worse one on the test rows
        assert validation["teacher"] < validation["before"] and test["teacher"] > test["before"]
        assert validation["best"] < validation["before"] and heal["best_step"] > 0
        assert heal["kept"] == kept and "HEAL MADE THE MODEL WORSE" in proc.stderr
        want, got = read_tensors(student), read_tensors(dst)
        same = all(got[k].equal(want[k]) for k in want)
        if kept == "input":
            assert same and test["after"] == test["before"]
        else:
            assert not same and test["after"] > test["before"]


def test_qwen3_heal_leaves_the_kept_source_projections_alone(tmp_path, calib_file):
    """A Qwen3 student keeps the source's q/k projections and per-head norms (the cache's
    rotation and latent are computed after them); heal trains only what the conversion computed,
    so with --train attention those stay the teacher's, bit for bit."""
    src = tiny_lm(tmp_path / "src", calib_file.read_text(), "qwen3")
    student = small_conversion(src, tmp_path / "mla", calib_file)
    dst = tmp_path / "healed"
    proc = heal_cli(src, student, dst, calib_file, 2048, "--precision", "fp32", "--keep-worse")
    assert proc.returncode == 0, proc.stderr[-3000:]
    heal = json.loads((dst / "transmla_report.json").read_text())["heal"]
    teacher, before, after = read_tensors(src), read_tensors(student), read_tensors(dst)
    kept = ("q_head_proj", "k_head_proj", "q_norm", "k_norm")
    computed = ("q_head_map", "kv_a_key_map", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
    for name, t in after.items():
        if any(f".{k}." in name for k in kept):
            source = name.replace("q_head_proj", "q_proj").replace("k_head_proj", "k_proj")
            assert t.equal(before[name]) and t.equal(teacher[source]), name
    if heal["kept"] == "healed":
        changed = {n for n in after if not after[n].equal(before[n])}
        assert changed and all(any(f".{c}." in n for c in computed) for n in changed)
