"""Start vLLM's OpenAI server (CPU, fp32, our plugin through its entry point) on 127.0.0.1 for
a test module, and stop it, whatever happens."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from converter.vllm_setup import cli_flags, cpu_engine_kwargs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def openai_server(
    model: Path, log_path: Path, served: str, max_model_len: int, timeout: float = 600
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Yield (base URL, process) once /health answers; the log tail explains a failed start."""
    port = free_port()
    log = open(log_path, "w")  # noqa: SIM115 (closed below, after the server)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model),
            "--served-model-name",
            served,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--trust-remote-code",
            *cli_flags(cpu_engine_kwargs(max_model_len)),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=dict(os.environ),
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError("server exited:\n" + log_path.read_text()[-6000:])
            try:
                urllib.request.urlopen(base + "/health", timeout=5)
                break
            except OSError:
                if time.time() > deadline:
                    raise AssertionError(
                        "server not healthy:\n" + log_path.read_text()[-6000:]
                    ) from None
                time.sleep(2)
        yield base, proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
