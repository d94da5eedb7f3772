"""Offline converter: GQA checkpoints (LLaMA / Qwen2 / Mistral) to MLA (DeepSeek layout)."""

__version__ = "0.1.0"
