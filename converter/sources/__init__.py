"""Source models: what the converter reads from a GQA checkpoint's config.json.

spec (SourceSpec, rope normalisation), tensors (source tensor names and shapes), adapter (the
family base class), one module per family (llama, qwen2, mistral, qwen3), registry (the list of
families), refusals (what is refused and how it is said), inspection (inspect_source). Nothing
is re-exported here: importing an adapter must not pull in the registry.
"""
