"""The plugin's config path in real vLLM (EngineArgs -> VllmConfig, no engine start): compact
latents are padded to what the CPU backend serves, and configs it cannot serve are refused with
a message naming the field."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm


def engine_config(model: Path):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(
        model=str(model),
        dtype="float32",
        trust_remote_code=True,
        kv_cache_memory_bytes=256 * 2**20,
        max_model_len=256,
    ).create_engine_config()


def damaged(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_compact_latent_is_padded_to_the_cpu_backend_size(converted):
    cfg = engine_config(converted["qwen2"])
    assert cfg.model_config.use_mla
    hf = cfg.model_config.hf_text_config
    assert (hf.kv_lora_rank, hf.qk_rope_head_dim) == (512, 64)  # 96 + 64 written, 576 served
    assert cfg.model_config.get_head_size() == 576


def _drop(field):
    return lambda c: c.pop(field)


def _set(path, value):
    def edit(c):
        node = c
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


@pytest.mark.parametrize(
    "edit,message",
    [
        (_set(("transmla", "latent_norm"), True), "'transmla.latent_norm' is true"),
        (_drop("qk_nope_head_dim"), "'qk_nope_head_dim' is missing"),
        (_drop("kv_lora_rank"), "'kv_lora_rank' is missing"),
        (_set(("q_lora_rank",), 64), "'q_lora_rank' must be null"),
        (
            _set(("rope_parameters",), {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
            "'rope_parameters.rope_type' is 'yarn'",
        ),
        (_set(("kv_lora_rank",), 600), "no vLLM MLA backend can serve it"),
    ],
)
def test_unservable_configs_are_refused_by_name(converted, tmp_path, edit, message):
    bad = damaged(converted["qwen2"], tmp_path / "bad", edit)
    with pytest.raises(Exception, match=re.escape(message)):
        engine_config(bad)
