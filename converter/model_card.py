"""The converted checkpoint's README.md: what it is, how it was made, how to serve it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from converter.sources.base import SourceSpec


def write_model_card(folder: Path, spec: SourceSpec, config: dict[str, Any],
                     summary: dict[str, Any], src_arg: str, src_path: Path) -> None:
    tm = config["transmla"]
    before = summary["kv_elements_per_token_per_layer"]["source"]
    after = summary["kv_elements_per_token_per_layer"]["converted"]
    layers = config["num_hidden_layers"]
    text = f"""---
base_model: {src_arg}
library_name: transformers
pipeline_tag: text-generation
tags:
- mla
- transmla
- vllm
---

# {Path(src_arg).name} converted to Multi-head Latent Attention

Converted from `{src_arg}` ({spec.architecture}) by transmla-vllm {tm['converter_version']}.
The KV cache holds one latent of {config['kv_lora_rank']} plus a shared rope key of
{config['qk_rope_head_dim']} per token and layer instead of per-head keys and values.

| setting | value |
|---|---|
| method | {tm['method']} |
| rope dim | {tm['rope_dim']} |
| kv_lora_rank | {tm['kv_lora_rank']} |
| freqfold | {tm['freqfold']} |
| calibration tokens | {tm['calibration']['tokens']} |
| KV elements / token / layer | {before} -> {after} |
| KV bytes / token (bf16, {layers} layers) | {2 * before * layers} -> {2 * after * layers} |

## Use

vLLM (`pip install transmla-vllm vllm`):

```bash
vllm serve ./this-folder --trust-remote-code
```

transformers:

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("./this-folder", trust_remote_code=True)
```
"""
    (folder / "README.md").write_text(text)
