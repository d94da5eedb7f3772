"""Test 4 of the spine: vLLM's OpenAI server serves a converted checkpoint through our plugin,
for plain completions and for chat (the source's chat template carried into the checkpoint)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from transmla_testing.serving import openai_server

pytestmark = pytest.mark.vllm

MAX_TOKENS = 16


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def server(converted, tmp_path_factory):
    model = converted["llama"]
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with openai_server(model, log_path, "mla", 512) as (base, _proc):
        yield base, model


@torch.no_grad()
def _greedy(model_dir: Path, ids: list[int]) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, trust_remote_code=True
    )
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens=MAX_TOKENS,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(ids) :].tolist()


def test_completions_match_transformers(server):
    base, model = server
    tok = AutoTokenizer.from_pretrained(model)
    prompt = "ROMEO. But soft, what light through yonder window breaks?"
    reply = _post(
        base + "/v1/completions",
        {
            "model": "mla",
            "prompt": prompt,
            "temperature": 0,
            "max_tokens": MAX_TOKENS,
            "ignore_eos": True,
            "return_token_ids": True,
        },
    )
    prompt_ids = tok(prompt)["input_ids"]
    want = _greedy(model, prompt_ids)
    choice = reply["choices"][0]
    assert reply["choices"][0]["prompt_token_ids"] == prompt_ids
    assert choice["token_ids"] == want and len(set(want)) >= 6
    # vLLM holds back a trailing incomplete UTF-8 sequence; the rest of the text must agree
    assert tok.decode(want, skip_special_tokens=True).startswith(choice["text"].rstrip("\ufffd"))
    assert reply["usage"]["completion_tokens"] == MAX_TOKENS


def test_chat_uses_the_carried_template(server):
    base, model = server
    tok = AutoTokenizer.from_pretrained(model)
    messages = [{"role": "user", "content": "Speak, what say you of the king?"}]
    reply = _post(
        base + "/v1/chat/completions",
        {
            "model": "mla",
            "messages": messages,
            "temperature": 0,
            "max_tokens": MAX_TOKENS,
            "ignore_eos": True,
            "return_token_ids": True,
        },
    )
    ids = tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert "<s>assistant:" in tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert reply["prompt_token_ids"] == ids
    want = _greedy(model, ids)
    assert reply["choices"][0]["token_ids"] == want and len(set(want)) >= 6
