"""Source-model adapters: one file per family; each knows its config quirks and tensor names."""

from converter.sources.base import SourceSpec, inspect_source

__all__ = ["SourceSpec", "inspect_source"]
