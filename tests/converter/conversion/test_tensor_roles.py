"""Which attention tensors are trained, and how each follows the latent dims (which decides
the fp8 cache scales' fold and the plugin's padding), is defined once (``ATTENTION_ROLES`` in
transmla_vllm/checkpoint_format.py). The layer-wise reconstruction, heal, the fp8 fold and the
padding must each follow it, and what it says must be true of
the converted attention: the tensors it leaves untrained are the source's own, and folding
scales into exactly the tensors it names (each needed) leaves the attention's output as it was.
Checked on a plain layer with biases (Qwen2) and a q/k-normed one (Qwen3)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, DeepseekV3Config

from converter.conversion.converted_layer import converted_rope
from converter.conversion.pipeline import ConvertOptions, convert
from converter.conversion.work import ConvertedAttention
from converter.heal.memory import trainable_names
from converter.math.fp8_scales import Fp8Scales, _fold_layout, apply_fp8_scales
from transmla_testing.models import make_model
from transmla_vllm.checkpoint_format import (
    ATTENTION_ROLES,
    ATTN_TENSORS,
    CONFIG_FILE,
    CONVERTED_ATTENTION,
    FP8_FOLDS,
    KEPT_ATTENTION,
    KV_A_ROWS,
    KV_B_COLUMNS,
    NORMED_ATTN_TENSORS,
    O_COLUMNS,
    O_PROJ,
    QUERY_ROWS,
    SINGLE_FILE,
    CheckpointLayout,
    layer_prefix,
)
from transmla_vllm.padding import PADDING

RANK, ROPE, SEQ = 16, 8, 32


class Layer:
    """Layer 0 of a converted tiny model: its converted attention (run with the source
    layer's norms and MLP), the source layer, and the converted layout."""

    def __init__(self, root, family: str, calib_file) -> None:
        src = make_model(root / "src", family, heads=4, kv_heads=2, head_dim=16, seed=5)
        dst = convert(
            ConvertOptions(
                src=str(src),
                dst=str(root / "dst"),
                rope_dim=ROPE,
                kv_lora_rank=RANK,
                freqfold=2,
                method="transmla",  # no fp8 stage: the test chooses the scales
                calib_text=str(calib_file),
                calib_samples=4,
                calib_seqlen=SEQ,
                dtype="float32",
            )
        )
        cfg = json.loads((dst / CONFIG_FILE).read_text())
        self.config = DeepseekV3Config(**{k: v for k, v in cfg.items() if k != "auto_map"})
        self.layout = CheckpointLayout.from_config(self.config)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        self.source = model.model.layers[0]
        written = load_file(str(dst / SINGLE_FILE))
        prefix = layer_prefix(0)
        self.tensors = {n: written[prefix + n] for n in self.layout.attention_shapes()}
        self.heads = self.config.num_attention_heads
        self.nope = self.config.qk_nope_head_dim
        self.hidden = self.config.hidden_size

    def attention(self) -> ConvertedAttention:
        rope = converted_rope(self.config, SEQ, "cpu")
        return ConvertedAttention(self.tensors, self.source, self.config, 0, rope, "cpu")


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def layer(request, tmp_path_factory, calib_file) -> Layer:
    return Layer(tmp_path_factory.mktemp(request.param), request.param, calib_file)


def test_every_attention_tensor_has_one_role():
    assert set(ATTENTION_ROLES) == set(ATTN_TENSORS) | set(NORMED_ATTN_TENSORS)
    assert {r.layout for r in ATTENTION_ROLES.values()} == {
        None,
        KV_A_ROWS,
        KV_B_COLUMNS,
        QUERY_ROWS,
        O_COLUMNS,
    }
    assert CONVERTED_ATTENTION == tuple(n for n, r in ATTENTION_ROLES.items() if r.trained)
    # o_proj is padded (v columns) but takes no fp8 scale; the kept source tensors get neither
    assert set(FP8_FOLDS) == set(PADDING) - {O_PROJ}
    assert set(PADDING) == {n for n, r in ATTENTION_ROLES.items() if r.layout}
    assert not {n for n, r in ATTENTION_ROLES.items() if not r.trained} & set(PADDING)
    assert set(KEPT_ATTENTION) == {n for n, r in ATTENTION_ROLES.items() if not r.trained}


def test_reconstruction_and_heal_train_the_tensors_the_table_names(layer):
    trained = {n for n in layer.tensors if ATTENTION_ROLES[n].trained}
    assert trained, layer.tensors.keys()
    attention = layer.attention()
    params = attention.trainable()  # what the reconstruction optimises
    live = attention.runner().conv.self_attn.named_parameters(prefix="self_attn")
    assert set(params) == trained
    assert {n for n, p in live if p.requires_grad} == trained  # and nothing else in the layer
    prefix = layer_prefix(0)
    heal = trainable_names(layer.layout, "attention")
    assert {n.removeprefix(prefix) for n in heal if n.startswith(prefix)} == trained


def test_untrained_tensors_are_the_sources_own(layer):
    attn = layer.source.self_attn
    own = [attn.q_proj.weight, attn.k_proj.weight]
    own += [getattr(attn, n).weight for n in ("q_norm", "k_norm") if hasattr(attn, n)]
    kept = {n for n, t in layer.tensors.items() if any(torch.equal(t, s) for s in own)}
    assert {n for n in layer.tensors if not ATTENTION_ROLES[n].trained} == kept
    # each is the source tensor the table names (heal shares it with the teacher by that name)
    source = dict(layer.source.named_parameters())
    for name in kept:
        assert layer.tensors[name].equal(source[KEPT_ATTENTION[name]]), name


@torch.no_grad()
def test_fp8_fold_changes_exactly_the_tensors_the_table_names_and_no_output(layer):
    g = torch.Generator().manual_seed(0)

    def exponents(n: int) -> list[int]:  # nonzero, so every component moves
        return [int(e) or 1 for e in torch.randint(-3, 4, (n,), generator=g)]

    scales = Fp8Scales(exponents(RANK), exponents(ROPE // 2))
    folded = apply_fp8_scales(layer.tensors, scales, layer.heads, layer.nope)
    changed = {n for n, t in layer.tensors.items() if not torch.equal(folded[n], t)}
    assert changed == {n for n in layer.tensors if n in FP8_FOLDS}
    # fit_to_dtype checks exactness on the same tensors the fold changes
    assert {
        row[0] for row in _fold_layout(layer.tensors, RANK, ROPE // 2, layer.heads, layer.nope)
    } == changed

    attention = layer.attention()
    h = torch.randn(2, SEQ, layer.hidden, generator=g)
    want = attention.runner().attention(h)

    def error(tensors: dict[str, torch.Tensor]) -> float:
        attention.set(tensors)
        return float((attention.runner().attention(h) - want).norm() / want.norm())

    assert error(folded) < 1e-6  # powers of two: the same function
    for name in sorted(changed):  # and each tensor named is needed
        assert error({**folded, name: layer.tensors[name]}) > 1e-3, name
