"""The plugin on damaged checkpoints: a real vLLM engine refuses them at load, by tensor name,
before it would serve anything."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from transmla_testing.models import edit_tensors

pytestmark = pytest.mark.vllm

START_ENGINE = """
import sys
from vllm import LLM
LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, trust_remote_code=True,
    compilation_config={"custom_ops": ["none"]}, kv_cache_memory_bytes=256 * 2**20,
    max_model_len=256)
print("ENGINE STARTED")
"""


def _narrow_kv_b(state):
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    state[name] = state[name][:, :-8].contiguous()


def _add_latent_norm(state):
    state["model.layers.0.self_attn.kv_a_layernorm.weight"] = torch.ones(96)


def _drop_lm_head(state):
    del state["lm_head.weight"]


@pytest.mark.parametrize(
    "family,damage,message",
    [
        (
            "llama",
            _narrow_kv_b,
            "Checkpoint tensor 'model.layers.1.self_attn.kv_b_proj.weight' has "
            "shape (512, 88), expected (512, 96) from config.json",
        ),
        (
            "llama",
            _add_latent_norm,
            "'model.layers.0.self_attn.kv_a_layernorm.weight' is a latent RMSNorm",
        ),
        (
            "qwen2",
            _drop_lm_head,
            "missing tensor(s) ['lm_head.weight'] (config has tie_word_embeddings false)",
        ),
    ],
)
def test_damaged_checkpoint_fails_at_engine_load_by_name(
    converted, tmp_path, family, damage, message
):
    bad = tmp_path / "bad"
    shutil.copytree(converted[family], bad)
    edit_tensors(bad, "model.safetensors", damage)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", START_ENGINE, str(bad)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode != 0 and "ENGINE STARTED" not in proc.stdout
    assert message in proc.stderr, proc.stderr[-4000:]
    assert time.time() - started < 240  # fails at weight loading, never reaches serving
