"""Helpers for the tests and the benchmarks, not used by the product (``converter``,
``transmla_vllm``): tiny seeded checkpoints and tokenizers (``models``), Shakespeare text
(``text``), runners for the converter CLI (``hooked``) and for vLLM (``vllm_runner``,
``serving``), a local Hub stand-in (``fake_hub``) and the docs/benchmarks.md writer
(``report``)."""
