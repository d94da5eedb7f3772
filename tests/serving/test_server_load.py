"""Load on vLLM's OpenAI server (CPU) with a converted checkpoint: 76 concurrent completion
requests of mixed lengths (1 to 1000 prompt tokens), 24 of them invalid (prompt over the model
length, temperature -1, max_tokens 0, top_p 0, n 0, too many logprobs, an out-of-vocabulary
token id, an unknown model name). The server must not crash or log a traceback, must answer the
invalid ones with the right 4xx and a message, and the valid ones (greedy, fp32) must get
exactly the tokens they get when sent one by one. A prompt that leaves less room than
max_tokens is answered with what fits (vLLM clamps max_tokens, finish_reason "length").
One server start for the module; loopback only."""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from transmla_testing.serving import openai_server

pytestmark = pytest.mark.vllm

MAX_MODEL_LEN = 256
VOCAB = 512
SERVED = "mla"


@pytest.fixture(scope="module")
def server(converted, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("load") / "server.log"
    with openai_server(converted["llama"], log_path, SERVED, MAX_MODEL_LEN) as (base, proc):
        yield base, proc, log_path


def _requests() -> list[tuple[str, dict, int]]:
    """(kind, body, expected HTTP status), shuffled so valid and invalid interleave."""
    rng = random.Random(0)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(3, VOCAB) for _ in range(n)]

    def body(n: int, max_tokens: int) -> dict:
        return {
            "model": SERVED,
            "prompt": prompt(n),
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        }

    out = []
    lengths = [1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 200, 230, 240]
    for i in range(48):
        n = lengths[i % len(lengths)]
        max_tokens = min([1, 3, 8, 16][i % 4], MAX_MODEL_LEN - n)
        out.append(("valid", body(n, max_tokens), 200))
    for n in (250, 255, 250, 255):  # max_tokens 100 does not fit: clamped to what does
        out.append(("clamped", body(n, 100), 200))
    for n in (256, 257, 300, 512, 1000, 256, 300, 1000):
        out.append(("prompt too long", body(n, 4), 400))
    invalid = [
        ("temperature -1", {"temperature": -1}),
        ("max_tokens 0", {"max_tokens": 0}),
        ("top_p 0", {"top_p": 0}),
        ("n 0", {"n": 0}),
        ("logprobs 1000", {"logprobs": 1000}),
        ("token id out of vocabulary", {"prompt": [5, VOCAB + 7, 9]}),
    ]
    for kind, extra in invalid * 2:
        out.append((kind, {**body(10, 4), **extra}, 400))
    for _ in range(4):
        out.append(("unknown model", {**body(10, 4), "model": "no-such-model"}, 404))
    rng.shuffle(out)
    return out


def _post(base: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        base + "/v1/completions",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_concurrent_mixed_load_matches_one_by_one(server):
    base, proc, log_path = server
    requests = _requests()
    assert len(requests) >= 64

    start = threading.Barrier(len(requests))

    def send(item):
        start.wait()  # every request in flight at once
        return _post(base, item[1])

    began = time.time()
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        together = list(pool.map(send, requests))
    concurrent_s = time.time() - began
    assert proc.poll() is None, "server died under load:\n" + log_path.read_text()[-6000:]

    alone = [_post(base, body) for _, body, _ in requests]
    assert proc.poll() is None
    with urllib.request.urlopen(base + "/health", timeout=10) as resp:
        assert resp.status == 200

    assert "Traceback" not in log_path.read_text()  # bad requests are refused, not crashed on
    for (kind, body, status), (got, reply), (got_alone, reply_alone) in zip(
        requests, together, alone, strict=True
    ):
        assert got == status, (kind, got, reply)
        assert got_alone == status, (kind, got_alone, reply_alone)
        if status != 200:
            assert reply.get("error", {}).get("message"), (kind, reply)
            continue
        choice, choice_alone = reply["choices"][0], reply_alone["choices"][0]
        want = min(body["max_tokens"], MAX_MODEL_LEN - len(body["prompt"]))
        assert len(choice["token_ids"]) == want and choice["finish_reason"] == "length"
        assert reply["usage"]["prompt_tokens"] == len(body["prompt"])
        assert choice["token_ids"] == choice_alone["token_ids"], (kind, len(body["prompt"]))
    print(f"{len(requests)} concurrent requests answered in {concurrent_s:.1f} s")
