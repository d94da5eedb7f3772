"""Strict checks of the tensors a checkpoint hands the plugin's loader, naming the tensor.

Strict on purpose: vLLM's own "weights not initialized" check exempts every unquantized linear
and embedding, so a missing tensor would silently leave uninitialised memory in the model, and a
wrong shape would fail deep inside a weight loader (or, after padding, not at all). The expected
names and shapes come from ``checkpoint_format``, the same place the converter writes them from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from transmla_vllm.checkpoint_format import (
    CONFIG_FILE,
    FORBIDDEN_SUFFIXES,
    IGNORED_SUFFIXES,
    LM_HEAD,
    CheckpointLayout,
    LatentDims,
)

# How many missing names an error lists before it only counts the rest.
_LIST_AT_MOST = 8


def _forbidden_module(name: str) -> str | None:
    """The DeepSeek norm module ``name`` belongs to, if the format forbids it."""
    for suffix in FORBIDDEN_SUFFIXES:
        module = suffix.rsplit(".", 1)[0]
        if f".{module}." in f".{name}":
            return module
    return None


class WeightChecks:
    """Checks tensor by tensor while loading, then that nothing expected was missing."""

    def __init__(self, config: Any, source: LatentDims) -> None:
        # The plugin's config already holds the padded, served dims: the checkpoint has source.
        self.layout = CheckpointLayout.from_config(config, dims=source)
        self.expected = self.layout.tensors()
        self.seen: set[str] = set()

    def skipped(self, name: str) -> bool:
        """Tensors the loader drops unread: rope caches, and a head tied to the embedding."""
        return name.endswith(IGNORED_SUFFIXES) or (
            self.layout.tie_word_embeddings and name == LM_HEAD
        )

    def check(self, name: str, tensor: torch.Tensor) -> None:
        """Raise a ValueError naming the tensor when it does not fit the config."""
        shape = tuple(tensor.shape)
        module = _forbidden_module(name)
        if module is not None:
            kind = "a latent RMSNorm" if module.startswith("kv_a") else "a query RMSNorm"
            raise ValueError(
                f"Checkpoint tensor '{name}' is {kind} ({module}); the TransMLA format has "
                "none (the conversion is exact only without it). Reconvert."
            )
        expected = self.expected.get(name)
        if expected is None:
            layout = self.layout
            raise ValueError(
                f"Unexpected checkpoint tensor '{name}' {shape} for this config "
                f"(q_bias={layout.q_bias}, kv_a_bias={layout.kv_a_bias}, "
                f"tie_word_embeddings={layout.tie_word_embeddings}); the weights do not match "
                "the config: reconvert the checkpoint."
            )
        if shape != expected:
            raise ValueError(
                f"Checkpoint tensor '{name}' has shape {shape}, expected {expected} from "
                f"{CONFIG_FILE}; the weights do not match the config: reconvert or re-download "
                "the checkpoint."
            )
        self.seen.add(name)

    def check_complete(self, held_here: Callable[[str], bool]) -> None:
        """Raise when an expected tensor this rank holds (``held_here``) never came."""
        missing = sorted(n for n in self.expected.keys() - self.seen if held_here(n))
        if not missing:
            return
        hint = " (config has tie_word_embeddings false)" if LM_HEAD in missing else ""
        more = len(missing) - _LIST_AT_MOST
        rest = f" and {more} more" if more > 0 else ""
        raise ValueError(
            f"Checkpoint is missing tensor(s) {missing[:_LIST_AT_MOST]}{rest}{hint}; it is "
            "incomplete: reconvert or re-download it."
        )
