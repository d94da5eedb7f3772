"""The registry: the one list of supported families. It imports every adapter module, and no
module an adapter imports imports it, so the adapters and the registry form no import circle."""

from __future__ import annotations

from collections.abc import Sequence

from converter.sources.adapter import FamilyAdapter
from converter.sources.llama import LlamaAdapter
from converter.sources.mistral import MistralAdapter
from converter.sources.qwen2 import Qwen2Adapter
from converter.sources.qwen3 import Qwen3Adapter, Qwen3MoeAdapter

# Order matters: the first adapter that accepts a config's model_type or architecture wins.
ADAPTERS: tuple[FamilyAdapter, ...] = (
    LlamaAdapter(),
    Qwen2Adapter(),
    MistralAdapter(),
    Qwen3Adapter(),
    Qwen3MoeAdapter(),
)


def _supported_sentence() -> str:
    """What every refusal offers instead, built from ADAPTERS so it cannot fall behind them."""
    archs = [a.architectures[0] for a in ADAPTERS]
    return f"full-attention {', '.join(archs[:-1])} or {archs[-1]} checkpoints convert (see README)"


SUPPORTED = _supported_sentence()


def adapter_for(family: str) -> FamilyAdapter:
    """The adapter of a family a spec already names (inspect_source chose it)."""
    return next(a for a in ADAPTERS if a.family == family)


def adapter_matching(model_type: str, architectures: Sequence[str]) -> FamilyAdapter | None:
    """The adapter that accepts this model_type or one of these architectures, if any."""
    return next(
        (
            a
            for a in ADAPTERS
            if model_type in a.model_types or any(x in a.architectures for x in architectures)
        ),
        None,
    )
