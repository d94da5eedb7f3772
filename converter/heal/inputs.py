"""The teacher / student pair, checked before any weight is loaded: the student must be a
converted folder, the teacher a supported source of the same family and vocabulary (normally the
model the student was converted from; another one is allowed with a warning)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converter.checkpoint.fingerprint import source_fingerprint
from converter.checkpoint.source import load_tokenizer, read_config, resolve_source
from converter.checkpoint.source_reader import SourceReader
from converter.errors import ConversionError
from converter.sources.inspection import inspect_source
from converter.sources.spec import SourceSpec
from transmla_vllm.checkpoint_format import (
    ARCHITECTURE,
    CONFIG_FILE,
    INDEX_FILE,
    SINGLE_FILE,
    transmla_block,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealPair:
    teacher: Path  # resolved local folder
    student: Path
    spec: SourceSpec  # the teacher's
    student_config: dict[str, Any]
    tokenizer: Any  # the teacher's (the student carries a copy)


def check_student(student: Path) -> dict[str, Any]:
    """The student's config.json, or one sentence saying it is not a converted folder."""
    hint = "pass the output folder of `python -m converter`"
    if not student.is_dir():
        raise ConversionError(f"--student {student} is not a folder; {hint}")
    if not (student / CONFIG_FILE).is_file():
        raise ConversionError(
            f"--student {student} has no {CONFIG_FILE}: it is not a converted folder; {hint}"
        )
    config = read_config(student)
    if ARCHITECTURE not in (config.get("architectures") or []) or not transmla_block(config):
        raise ConversionError(
            f"--student {student} is not a converted checkpoint (its config.json has no "
            f"{ARCHITECTURE} architecture and 'transmla' block); {hint}"
        )
    if not any((student / f).is_file() for f in (SINGLE_FILE, INDEX_FILE)):
        raise ConversionError(f"--student {student} holds no {SINGLE_FILE} / {INDEX_FILE}; {hint}")
    return config


def check_teacher(teacher: Path) -> SourceSpec:
    config = read_config(teacher)
    if transmla_block(config):
        raise ConversionError(
            f"--teacher {teacher} is a converted checkpoint; pass the source model the "
            "student was converted from"
        )
    try:
        return inspect_source(config)
    except ConversionError as exc:
        raise ConversionError(f"--teacher {teacher} is not a supported source: {exc}") from exc


def check_pair(teacher_arg: str, student_arg: str, revision: str | None = None) -> HealPair:
    """Refuse a pair that cannot be distilled (see the module docstring)."""
    student = Path(student_arg)
    config = check_student(student)
    teacher = resolve_source(teacher_arg, revision)
    spec = check_teacher(teacher)
    block = transmla_block(config)
    family = block.get("source_architecture")
    if family and family != spec.architecture:
        raise ConversionError(
            f"--teacher {teacher_arg} is a {spec.architecture} but --student {student} was "
            f"converted from a {family}; pass the model the student was converted from"
        )
    if int(config.get("vocab_size", -1)) != spec.vocab_size:
        raise ConversionError(
            f"--teacher {teacher_arg} has a vocabulary of {spec.vocab_size} tokens and --student "
            f"{student} one of {config.get('vocab_size')}; distillation compares next-token "
            "laws token by token, so pass the model the student was converted from"
        )
    tokenizer = load_tokenizer(teacher)
    # the student's files read by the teacher's tokenizer class: AutoTokenizer picks the class
    # from config.json's model_type, and a class may add defaults of its own (Qwen2's adds
    # <|endoftext|> when a tokenizer lacks it)
    load_tokenizer(student)  # one sentence when its files are missing or broken
    if tokenizer.get_vocab() != type(tokenizer).from_pretrained(student).get_vocab():
        raise ConversionError(
            f"--teacher {teacher_arg} and --student {student} have different vocabularies "
            "(their tokenizers map tokens to other ids); pass the model the student was "
            "converted from"
        )
    recorded = block.get("source_fingerprint")
    if recorded:
        reader = SourceReader(teacher, spec)
        try:
            found = source_fingerprint(spec, reader)
        finally:
            reader.release()
        if found != recorded:
            log.warning(
                "--teacher %s is not the model --student %s was converted from (other weights, "
                "same family and vocabulary); distilling from it anyway",
                teacher_arg,
                student,
            )
    return HealPair(teacher, student, spec, config, tokenizer)
