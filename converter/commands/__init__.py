"""Subcommands of ``python -m converter`` besides conversion; one module per command, each
with ``main(argv) -> int``. Conversion itself stays the default command (no name needed)."""

COMMANDS = {
    "upload": "publish a converted folder to the Hugging Face Hub",
    "inspect": "KV cache sizes and capacity of a source or converted folder",
    "eval": "perplexity of a source or converted folder on a text file",
    "verify": "compare a converted folder with its source (PPL, top-1 agreement, KL)",
}
