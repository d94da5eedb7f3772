"""The converted decoder layer, run during conversion: our transformers remote code with one
layer's assembled weights, used to score FreqFold candidates, refit o_proj and carry the
converted stream."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from converter.conversion.blocked_mlp import use_blocked_mlps
from transmla_vllm.checkpoint_format import CheckpointLayout


def converted_layer(
    layer: nn.Module, mla: dict[str, torch.Tensor], cfg: Any, index: int, device: str
) -> nn.Module:
    """The converted decoder layer with attention weights ``mla`` and the source's own norms
    and MLP (as stored, run blocked)."""
    from converter.remote_code.modeling_transmla import TransMLADecoderLayer

    with torch.device("meta"):
        conv = TransMLADecoderLayer(cfg, index)
    state = {name: t.to(torch.float32) for name, t in mla.items()}  # no copy: already fp32
    source = layer.state_dict()
    for name in CheckpointLayout.from_config(cfg).dense_shapes(index):
        state[name] = source[name].detach()
    conv.load_state_dict(state, strict=True, assign=True)
    use_blocked_mlps(conv.mlp)
    return conv.to(device).eval()


def converted_rope(cfg: Any, seqlen: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rope tables of the converted layers: the same for every layer."""
    from converter.remote_code.modeling_transmla import TransMLARotary

    positions = torch.arange(seqlen, device=device)[None]
    return TransMLARotary(cfg)(positions)


class ConvertedRunner:
    """Runs the converted layer on [B, T, D] batches: its rope, causal attention (mask None)."""

    mask = None  # the remote code's plain causal attention (its fused kernel)

    def __init__(self, conv: nn.Module, rope: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.conv = conv
        self.rope = rope

    def layer(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv(h, self.rope, self.mask, None)

    def attention(self, h: torch.Tensor) -> torch.Tensor:
        """The converted attention output for residual stream ``h``."""
        x = self.conv.input_layernorm(h)
        return self.conv.self_attn(x, self.rope, self.mask, None)

    def attention_input_to_o(self, h: torch.Tensor) -> torch.Tensor:
        """What the converted attention feeds o_proj (per-head outputs, concatenated)."""
        captured = {}
        hook = self.conv.self_attn.o_proj.register_forward_pre_hook(
            lambda _m, args: captured.__setitem__("a", args[0])
        )
        try:
            self.attention(h)
        finally:
            hook.remove()
        return captured["a"]
