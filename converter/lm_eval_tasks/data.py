"""Datasets of the shipped tasks, read from the JSONL files next to this module: lm-eval resolves
``data_files`` against the working directory, so the YAML names this loader (``custom_dataset``)
and the tasks work from any directory with ``--include_path``."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _dataset(name: str):
    from datasets import Dataset, DatasetDict

    lines = (HERE / name).read_text(encoding="utf-8").splitlines()
    return DatasetDict({"test": Dataset.from_list([json.loads(line) for line in lines])})


def cloze(**_metadata):
    """``transmla_cloze``'s items (lm-eval passes the task's metadata, unused here)."""
    return _dataset("cloze.jsonl")


def complete(**_metadata):
    """``transmla_complete``'s items."""
    return _dataset("complete.jsonl")
