"""What the card says about the source model: its Hub id (or local folder name) and its
attention geometry, taken from the SourceSpec at conversion time or from config.json's
``transmla`` block when the card is rebuilt later."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SourceInfo:
    """The source as the card names and describes it (None: not known)."""

    hub_id: str | None
    name: str
    architecture: str
    heads: int | None
    kv_heads: int | None
    head_dim: int | None

    @property
    def ref(self) -> str:
        """A Hub link when the id is known; a local path never leaves the machine."""
        if self.hub_id:
            return f"[{self.hub_id}](https://huggingface.co/{self.hub_id})"
        return f"the local folder `{self.name}`"


def source_name(hub_id: str | None, src_arg: str) -> str:
    """The short name the card's title uses: the Hub name, else --src's last folder."""
    return hub_id.split("/")[-1] if hub_id else Path(src_arg.rstrip("/")).name or "model"
