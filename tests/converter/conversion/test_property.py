"""Property: for any small source geometry and flags, the converter either writes a checkpoint
that transformers loads and runs with finite logits, or refuses with a ConversionError whose
message is one line, leaving nothing at --dst and no staging folder next to it. No other
exception may escape (that would be a traceback for the user).

Hypothesis draws family, heads, KV heads, head_dim, hidden size, layers, tying, biases and the
conversion flags (rope dim, rank, FreqFold), valid or not. Bounded: 15 derandomized examples of
tiny models (vocab 512, hidden <= 32, <= 2 layers, 2 calibration chunks of 16 tokens).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from converter.conversion.pipeline import ConvertOptions, convert
from converter.errors import ConversionError
from transmla_testing.models import family_classes, make_tokenizer
from transmla_testing.text import play_text

FAMILIES = ("llama", "mistral", "qwen2")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """One tokenizer (trained once) and one calibration file for every example."""
    root = tmp_path_factory.mktemp("property")
    make_tokenizer(root / "tok")
    (root / "calib.txt").write_text(play_text("twelfth-night")[:20000])
    return root


@st.composite
def cases(draw):
    family = draw(st.sampled_from(FAMILIES))
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2])) + draw(
        st.sampled_from([0, 0, 0, 0, 0, 1])
    )  # sometimes not a multiple: refused
    head_dim = draw(st.sampled_from([4, 6, 8, 8, 12, 16, 5]))  # 5 is odd: refused
    model = dict(
        family=family,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        hidden=heads * draw(st.sampled_from([4, 8])),
        layers=draw(st.sampled_from([1, 2])),
        tied=draw(st.booleans()),
        attention_bias=family == "llama" and draw(st.booleans()),  # o_proj bias
        mlp_bias=family == "llama" and draw(st.booleans()),
    )
    flags = dict(
        rope_dim=draw(st.one_of(st.none(), st.sampled_from([2, 4, 6, 8]))),
        kv_lora_rank=draw(st.one_of(st.none(), st.sampled_from([0, 1, 3, 8, 1000]))),
        freqfold=draw(st.one_of(st.none(), st.sampled_from([1, 2, 3]))),
    )
    return model, flags


def write_source(folder: Path, tok: Path, m: dict) -> bool:
    """Save a random model; where transformers itself rejects the geometry (odd head_dim,
    heads not a multiple of KV heads) write only config.json and the tokenizer, and return
    False: the converter must then refuse from config.json alone."""
    config_cls, model_cls, extra = family_classes(m["family"])
    kw = dict(
        vocab_size=512,
        hidden_size=m["hidden"],
        intermediate_size=2 * m["hidden"],
        num_hidden_layers=m["layers"],
        num_attention_heads=m["heads"],
        num_key_value_heads=m["kv_heads"],
        head_dim=m["head_dim"],
        max_position_embeddings=256,
        tie_word_embeddings=m["tied"],
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )
    if m["family"] == "llama":
        kw.update(attention_bias=m["attention_bias"], mlp_bias=m["mlp_bias"])
    try:
        config = config_cls(**kw)
    except Exception:  # transformers' strict config validation
        config = None
    folder.mkdir(parents=True)
    if config is None:
        raw = {
            **kw,
            "model_type": m["family"],
            "architectures": [model_cls.__name__],
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        }
        (folder / "config.json").write_text(json.dumps(raw))
    else:
        torch.manual_seed(0)
        model_cls(config).save_pretrained(folder)
    for f in tok.iterdir():
        shutil.copy(f, folder / f.name)
    return config is not None


def must_refuse(m: dict, f: dict) -> bool:
    """Inputs the converter has to refuse (a partial oracle: others may go either way)."""
    d, r = m["head_dim"], f["rope_dim"]
    return (
        m["heads"] % m["kv_heads"] != 0
        or d % 2 == 1
        or m["attention_bias"]
        or m["mlp_bias"]
        or (r is not None and d % r != 0)
        or (f["kv_lora_rank"] is not None and f["kv_lora_rank"] < 1)
    )


def must_convert(m: dict, f: dict) -> bool:
    """Inputs it has to convert: a valid GQA geometry and default or valid flags."""
    return (
        not must_refuse(m, f)
        and f["freqfold"] is None
        and (f["rope_dim"] is None or m["head_dim"] % f["rope_dim"] == 0)
    )


@settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=cases())
def test_converts_and_loads_or_refuses_clearly(assets, case):
    m, f = case
    root = Path(tempfile.mkdtemp(dir=assets))
    try:
        buildable = write_source(root / "src", assets / "tok", m)
        dst = root / "out"
        opts = ConvertOptions(
            src=str(root / "src"),
            dst=str(dst),
            calib_text=str(assets / "calib.txt"),
            calib_samples=2,
            calib_seqlen=16,
            **f,
        )
        try:
            convert(opts)
        except ConversionError as exc:
            message = str(exc)
            event("refused")
            assert message and "\n" not in message and "Traceback" not in message
            assert not dst.exists()
            assert sorted(p.name for p in root.iterdir()) == ["src"]  # no staging left
            assert not must_convert(m, f), f"valid input refused: {message}"
            if not buildable:  # refused from config.json, not for the missing weights
                assert "safetensors" not in message, message
            return
        event("converted")
        assert buildable and not must_refuse(m, f), "invalid input converted"
        cfg = json.loads((dst / "config.json").read_text())
        assert cfg["tie_word_embeddings"] == m["tied"]
        assert sorted(p.name for p in root.iterdir()) == ["out", "src"]
        model = AutoModelForCausalLM.from_pretrained(
            dst, dtype=torch.float32, trust_remote_code=True
        )
        with torch.no_grad():
            logits = model(torch.tensor([[1, 40, 41, 42, 43, 44]])).logits
        assert logits.shape == (1, 6, 512) and torch.isfinite(logits).all()
    finally:
        shutil.rmtree(root, ignore_errors=True)
