"""Commands of ``python -m converter``; one module per command, each with
``main(argv) -> int``. Conversion (convert.py) is the default command (no name needed)."""

import logging

# HTTP and lock chatter that would drown the converter's own INFO lines
NOISY_LOGGERS = ("httpx", "httpx2", "urllib3", "filelock")


def setup_logging(debug: bool) -> None:
    """One log format for every command; --debug shows DEBUG lines (and tracebacks)."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


COMMANDS = {
    "upload": "publish a converted folder to the Hugging Face Hub",
    "inspect": "KV cache sizes and capacity of a source or converted folder",
    "eval": "perplexity of a source or converted folder on a text file",
    "verify": "compare a converted folder with its source (PPL, top-1 agreement, KL)",
    "heal": "distil the source into a converted folder (KL on real text), best held-out PPL kept",
}
