"""The converted checkpoint's README.md: what it is, how it was made, what it saves, how good
it is, how to serve it.

The YAML header is huggingface_hub's own ``ModelCardData`` (``metadata``); the body is plain
Markdown written from config.json's ``transmla`` block and the conversion report (``kv``,
``tables``, ``snippets``, assembled by ``compose``), so ``refresh_model_card`` can rewrite it
later (after ``verify`` or ``heal``) without the source at hand.
"""

from converter.hub.card.build import (
    build_model_card,
    refresh_model_card,
    render_model_card,
    write_model_card,
)

__all__ = ["build_model_card", "refresh_model_card", "render_model_card", "write_model_card"]
