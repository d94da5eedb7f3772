"""Layer-by-layer calibration: the source model is never loaded whole.

Hidden states of the calibration chunks are carried from layer to layer; each decoder layer is
built from the source's own transformers class with weights read from safetensors, used, and
freed. Two streams can be carried: the source model's (faithful to the published method) and
the converted model's (so later layers are calibrated on what they will really see, and o_proj
can be refit to pull the converted stream back toward the source).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from converter.checkpoint.source_reader import SourceReader
from converter.conversion.blocked_mlp import use_blocked_mlps
from converter.sources.registry import adapter_for
from converter.sources.spec import SourceSpec
from converter.sources.tensors import source_layer_tensors
from transmla_vllm.checkpoint_format import EMBED, ROUTER, layer_prefix


class SourceLayers:
    """Builds one source decoder layer at a time (transformers' own class for the family)."""

    def __init__(
        self, folder: Path, spec: SourceSpec, reader: SourceReader, device: str, seqlen: int
    ) -> None:
        from transformers import AutoConfig

        self.spec, self.reader, self.device = spec, reader, device
        self.config = AutoConfig.from_pretrained(folder)
        self.config._attn_implementation = "sdpa"
        adapter = adapter_for(spec.family)
        module = importlib.import_module(adapter.modeling_module)
        self.layer_cls = getattr(module, adapter.layer_class)
        rotary = getattr(module, adapter.rotary_class)(self.config).to(device)
        positions = torch.arange(seqlen, device=device)[None]
        probe = torch.zeros(1, device=device, dtype=torch.float32)
        self.rope = rotary(probe, positions)

    def embed(self, chunks: torch.Tensor) -> torch.Tensor:
        """Rows of the embedding table, in fp32 (the table itself stays in its own dtype)."""
        table = self.reader.get(EMBED, dtype=None)
        rows = table[chunks].to(torch.float32)
        del table
        self.reader.release()
        return rows

    def layer(self, i: int) -> nn.Module:
        """Attention and norms in fp32; the MLP (two thirds of the layer) stays as stored,
        memory-mapped, and runs blocked (converter/blocked_mlp.py)."""
        prefix = layer_prefix(i)
        state = {
            part: self.reader.get(
                prefix + part,
                dtype=None if part.startswith("mlp.") and part != ROUTER else torch.float32,
            )
            for part in source_layer_tensors(self.spec, i)
        }
        with torch.device("meta"):
            layer = self.layer_cls(self.config, i)
            moe = self.spec.moe
            if moe is not None and i in moe.sparse_layers:
                # Qwen3-MoE routing with one module per expert, under the checkpoint's names,
                # so the experts stay memory-mapped (transformers' own block fuses them)
                from converter.remote_code.modeling_transmla import TransMLAQwen3MoE

                layer.mlp = TransMLAQwen3MoE(self.spec.hidden_size, asdict(moe))
        layer.load_state_dict(state, strict=True, assign=True)
        use_blocked_mlps(layer.mlp)
        return layer.to(self.device).eval()


def batched(
    hidden: torch.Tensor,
    batch: int,
    device: str,
    fn: Callable[[torch.Tensor, slice], torch.Tensor | None],
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Apply ``fn`` to device batches of ``hidden`` [N, T, D]; collect outputs on the CPU in
    one preallocated tensor (a list + cat would hold the calibration states twice), or in
    ``out``, which may be ``hidden`` itself: each batch is read before its slot is written."""
    for start in range(0, hidden.shape[0], batch):
        sl = slice(start, start + batch)
        part = fn(hidden[sl].to(device), sl)
        if part is None:
            continue
        if out is None:
            out = torch.empty((hidden.shape[0], *part.shape[1:]), dtype=part.dtype)
        out[sl] = part.to("cpu")
    return out


def accumulate_gram(acc: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """acc += y^T x (y = x when None) over all tokens of one batch, in fp64 and in place (no
    second Gram-sized temporary: 0.5 GB at hidden 8192). fp64 because small eigen-directions of
    V decide the latent, and an fp32 product already perturbs them enough to break exact
    conversions (fp64 costs about 2x here, not more)."""
    a = x.reshape(-1, x.shape[-1]).double()
    b = a if y is None else y.reshape(-1, y.shape[-1]).double()
    acc.addmm_(b.T, a)
