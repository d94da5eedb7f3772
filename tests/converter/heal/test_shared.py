"""heal holds once what teacher and student share: each frozen student tensor equal to the
teacher's becomes the teacher's (same storage), one that differs stays the student's, the
written weights and figures are those of a run without sharing, and the memory estimate and
report count it."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch

from converter.conversion.pipeline import ConvertOptions, convert
from converter.heal.inputs import check_pair
from converter.heal.memory import estimate
from converter.heal.models import load_models
from converter.heal.shared import DIFFERS, TRAINED, share_frozen
from transmla_testing import conversions
from transmla_testing.hooked import run_cli
from transmla_testing.models import edit_tensors, make_model, read_tensors
from transmla_vllm.checkpoint_format import (
    DOWN_PROJ,
    EMBED,
    LM_HEAD,
    Q_HEAD_PROJ,
    SINGLE_FILE,
    CheckpointLayout,
    layer_prefix,
)

SEQLEN = 64
EDITED = layer_prefix(1) + DOWN_PROJ  # made to differ from the teacher's


@pytest.fixture(scope="module")
def pair(tmp_path_factory, calib_file) -> tuple[Path, Path]:
    """A Qwen3 (untied head, kept q/k projections and norms) and its conversion, whose layer-1
    down projection is then nudged so it differs from the teacher's."""
    root = tmp_path_factory.mktemp("shared")
    src = make_model(root / "src", "qwen3", hidden=64, heads=4, kv_heads=2, tied=False, seed=5)
    student = convert(
        ConvertOptions(
            src=str(src),
            dst=str(root / "mla"),
            rope_dim=8,
            kv_lora_rank=16,
            calib_text=str(calib_file),
            calib_samples=4,
            calib_seqlen=SEQLEN,
            dtype="float32",
        )
    )

    def nudge(state: dict[str, torch.Tensor]) -> None:
        state[EDITED] = state[EDITED] + 1e-3

    edit_tensors(student, SINGLE_FILE, nudge)
    return src, student


def test_equal_frozen_tensors_are_held_once_and_a_different_one_is_not(pair):
    src, student = pair
    heal_pair = check_pair(str(src), str(student))
    layout = CheckpointLayout.from_config(heal_pair.student_config)
    candidates = layout.kept_from_source()
    teacher, model = load_models(heal_pair, "attention", "cpu", "fp32", checkpointing=False)
    values = {n: t.clone() for n, t in model.state_dict().items()}
    own_copies = {n: weakref.ref(p) for n, p in model.named_parameters()}
    report = share_frozen(teacher, model, candidates)
    gc.collect()
    # independent of the code: which kept tensors the files hold equal, and which student
    # parameters now use a teacher parameter's storage
    on_disk, source = read_tensors(student), read_tensors(src)
    equal = {n for n, s in candidates.items() if on_disk[n].equal(source[s])}
    assert {EMBED, LM_HEAD, layer_prefix(0) + Q_HEAD_PROJ} <= equal
    assert equal == set(candidates) - {EDITED}
    teacher_storage = {p.data_ptr() for p in teacher.parameters()}
    params = dict(model.named_parameters())
    held_once = {n for n, p in params.items() if p.data_ptr() in teacher_storage}
    assert set(report.shared) == held_once == equal
    assert report.kept == {EDITED: DIFFERS}
    # the student's own copies of those are gone (nothing else holds them), the rest stay
    assert {n for n, ref in own_copies.items() if ref() is None} == held_once
    assert all(params[n].requires_grad for n in set(params) - held_once - {EDITED})
    # the student computes with the same values as before
    after = model.state_dict()
    assert all(after[n].equal(t) for n, t in values.items())
    # the estimate counts, before loading, every kept tensor as shared: the difference is the
    # bytes of those the run did share plus the one that differed
    nbytes = sum(params[n].numel() * params[n].element_size() for n in held_once)
    assert report.shared_bytes == nbytes
    sizes = (heal_pair.spec, layout, "attention", 4, SEQLEN, "cpu")
    saved = estimate(*sizes, share=False).total - estimate(*sizes, share=True).total
    assert saved == nbytes + 4 * on_disk[EDITED].numel()
    # sharded over 2 ranks, each holds half of every decoder layer of the teacher and of the
    # trained state, and the embeddings, final norm and head whole
    one, two = estimate(*sizes), estimate(*sizes, ranks=2)
    n_train = sum(params[n].numel() for n in params if params[n].requires_grad)
    n_source = sum(t.numel() for t in source.values())
    n_whole = sum(t.numel() for n, t in source.items() if not n.startswith("model.layers."))
    assert one.parts["teacher"] == 4 * n_source
    assert two.parts["teacher"] == 4 * (n_whole + (n_source - n_whole) / 2)
    assert one.parts["gradients+AdamW"] - two.parts["gradients+AdamW"] == 3 * 4 * n_train / 2
    assert one.parts["student"] - two.parts["student"] == 4 * n_train / 2
    assert one.host - two.host == 4 * n_train / 2
    # training every weight shares nothing
    teacher, model = load_models(heal_pair, "all", "cpu", "fp32", checkpointing=False)
    report = share_frozen(teacher, model, candidates)
    assert report.shared == [] and set(report.kept.values()) == {TRAINED}
    assert estimate(*sizes[:2], "all", *sizes[3:], share=True).total == (
        estimate(*sizes[:2], "all", *sizes[3:], share=False).total
    )


def test_heal_with_sharing_writes_what_heal_without_it_writes(pair, tmp_path, calib_file):
    flags = ("--seqlen", str(SEQLEN), "--batch-size", "4", "--eval-tokens", "512")
    flags += ("--lr", "1e-2", "--precision", "fp32", "--keep-worse")
    reports = {}
    for name, extra in (("shared", ()), ("own", ("--no-share",))):
        dst = tmp_path / name
        proc = run_cli(conversions.heal_args(*pair, dst, 2048, calib_file, *flags, *extra))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ("share the teacher's copy" in proc.stderr) == (name == "shared")
        reports[name] = json.loads((dst / "transmla_report.json").read_text())["heal"]
    want, got = read_tensors(tmp_path / "own"), read_tensors(tmp_path / "shared")
    assert list(want) == list(got) and all(got[n].equal(want[n]) for n in want)
    assert any(not got[n].equal(t) for n, t in read_tensors(pair[1]).items())  # it trained

    def figures(report: dict) -> list:
        history = [{k: v for k, v in h.items() if k != "seconds"} for h in report["history"]]
        return [history, report["test"], report["validation"], report["best_step"]]

    assert figures(reports["shared"]) == figures(reports["own"])
    shared, own = reports["shared"]["memory"], reports["own"]["memory"]
    assert own["sharing"] is None
    layout = CheckpointLayout.from_config(json.loads((pair[1] / "config.json").read_text()))
    assert shared["sharing"]["shared_tensors"] == len(layout.kept_from_source()) - 1
    assert shared["sharing"]["differing"] == [EDITED]
    estimated = shared["estimate_bytes"]
    assert own["estimate_bytes"]["total"] - estimated["total"] == estimated["shared"] > 0
    # the measured peak: the whole process's, so above both models' weights and of the order
    # of the estimate (on a model this small, mostly the interpreter and torch, which the
    # estimate counts as a fixed overhead)
    weights = sum(t.numel() * 4 for d in pair for t in read_tensors(d).values())
    for memory in (shared, own):
        total = memory["estimate_bytes"]["total"]
        assert "VmHWM" in memory["peak_measured_as"]
        assert max(weights, total / 2) < memory["peak_bytes"] < 3 * total
