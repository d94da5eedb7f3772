"""Run a decoder layer's gate/up/down MLP with its weights left in the checkpoint's dtype.

The streaming converter needs a source layer's MLP only to carry the calibration hidden states
to the next layer and to copy its weights to the output. Upcasting gate/up/down to fp32 for that
would hold 3x their bf16 size (for a Llama-3-8B layer 0.70 GB next to the 0.35 GB of mapped
pages); instead the weights stay as read (memory-mapped views) and the product runs in the
activation dtype over blocks of intermediate rows, so only one block of each matrix is ever
upcast and the [tokens, intermediate] activations never exist whole.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

BLOCK_ROWS = 2048  # intermediate rows per block: 32 MB of fp32 per matrix at hidden 4096


def blocked_mlp_forward(mlp: nn.Module, x: torch.Tensor, block: int = BLOCK_ROWS) -> torch.Tensor:
    """down(act(gate(x)) * up(x)), computed in ``x.dtype`` block by block."""
    act = getattr(mlp, "act_fn", F.silu)
    gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    out: torch.Tensor | None = None
    for start in range(0, gate.shape[0], block):
        rows = slice(start, start + block)
        inner = act(F.linear(x, gate[rows].to(x.dtype))) * F.linear(x, up[rows].to(x.dtype))
        part = F.linear(inner, down[:, rows].to(x.dtype))
        out = part if out is None else out.add_(part)
    assert out is not None
    return out


def use_blocked_mlp(mlp: nn.Module, block: int = BLOCK_ROWS) -> nn.Module:
    """Make ``mlp`` (any gate/up/down MLP without biases) run blocked; returns it."""
    for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        if lin.bias is not None:
            raise ValueError("blocked MLP forward supports MLPs without biases only")
    mlp.forward = functools.partial(blocked_mlp_forward, mlp, block=block)
    return mlp


def use_blocked_mlps(mlp: nn.Module, block: int = BLOCK_ROWS) -> nn.Module:
    """``use_blocked_mlp`` on a dense MLP, or on every expert of a mixture of experts (its
    router stays as it is); returns ``mlp``."""
    for module in getattr(mlp, "experts", None) or [mlp]:
        use_blocked_mlp(module, block)
    return mlp
