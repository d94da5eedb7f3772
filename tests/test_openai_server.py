"""Test 4 of the spine: vLLM's OpenAI server serves a converted checkpoint through our plugin,
for plain completions and for chat (the source's chat template carried into the checkpoint)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

MAX_TOKENS = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def server(converted, tmp_path_factory):
    model = converted["llama"]
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
         "--served-model-name", "mla", "--host", "127.0.0.1", "--port", str(port),
         "--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--trust-remote-code",
         "--compilation-config", '{"custom_ops": ["none"]}',
         "--kv-cache-memory-bytes", str(256 * 2**20)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ))
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError("server exited:\n" + log_path.read_text()[-6000:])
            try:
                urllib.request.urlopen(base + "/health", timeout=5)
                break
            except OSError:
                if time.time() > deadline:
                    raise AssertionError("server not healthy:\n"
                                         + log_path.read_text()[-6000:]) from None
                time.sleep(2)
        yield base, model
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


@torch.no_grad()
def _greedy(model_dir: Path, ids: list[int]) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 trust_remote_code=True)
    out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_completions_match_transformers(server):
    base, model = server
    tok = AutoTokenizer.from_pretrained(model)
    prompt = "ROMEO. But soft, what light through yonder window breaks?"
    reply = _post(base + "/v1/completions", {"model": "mla", "prompt": prompt, "temperature": 0,
                                             "max_tokens": MAX_TOKENS, "ignore_eos": True,
                                             "return_token_ids": True})
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
    reply = _post(base + "/v1/chat/completions", {"model": "mla", "messages": messages,
                                                  "temperature": 0, "max_tokens": MAX_TOKENS,
                                                  "ignore_eos": True,
                                                  "return_token_ids": True})
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                  return_dict=True)["input_ids"]
    assert "<s>assistant:" in tok.apply_chat_template(messages, add_generation_prompt=True,
                                                      tokenize=False)
    assert reply["prompt_token_ids"] == ids
    want = _greedy(model, ids)
    assert reply["choices"][0]["token_ids"] == want and len(set(want)) >= 6
