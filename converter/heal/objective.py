"""The distillation objective and the held-out measure.

Loss: KL(teacher || student) of the next-token laws, averaged over every position, optionally
plus a hidden-state term (mean squared difference of the final normed hidden states, relative
to the teacher's mean square). The logits are made LOSS_CHUNK positions at a time inside a
checkpoint, so a step never holds [batch, seqlen, vocab] logits (1 GB per 2048 tokens at
Llama-3's 128k vocabulary) and their gradient, only one chunk's.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSS_CHUNK = 2048  # positions whose logits exist at once


def autocast(device: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on a GPU; plain fp32 on the CPU (bf16 matmuls are slow on most CPUs)."""
    if device == "cpu":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=torch.bfloat16)


def hidden_states(model, ids: torch.Tensor) -> torch.Tensor:
    """Final (normed) hidden states of a causal LM, before its head."""
    return model.model(input_ids=ids, use_cache=False).last_hidden_state


def _chunk_kl(
    s_hidden: torch.Tensor, t_hidden: torch.Tensor, s_head: torch.Tensor, t_head: torch.Tensor
) -> torch.Tensor:
    s_logp = F.linear(s_hidden, s_head).float().log_softmax(-1)
    with torch.no_grad():
        t_logp = F.linear(t_hidden, t_head).float().log_softmax(-1)
    return F.kl_div(s_logp, t_logp, log_target=True, reduction="sum")


def distill_loss(
    s_hidden: torch.Tensor,
    t_hidden: torch.Tensor,
    s_head: torch.Tensor,
    t_head: torch.Tensor,
    hidden_weight: float = 0.0,
) -> tuple[torch.Tensor, float]:
    """(loss to minimise, mean KL per position in nats)."""
    s, t = s_hidden.flatten(0, 1), t_hidden.detach().flatten(0, 1)
    total = s.new_zeros((), dtype=torch.float32)
    for i in range(0, s.shape[0], LOSS_CHUNK):
        part = slice(i, i + LOSS_CHUNK)
        total = total + checkpoint(_chunk_kl, s[part], t[part], s_head, t_head, use_reentrant=False)
    kl = total / s.shape[0]
    loss = kl
    if hidden_weight:
        scale = t.float().pow(2).mean()
        loss = loss + hidden_weight * (s.float() - t.float()).pow(2).mean() / scale
    return loss, float(kl.detach())


@torch.no_grad()
def held_out_nll(model, rows: torch.Tensor, device: str, batch_size: int) -> float:
    """Mean next-token negative log-likelihood (nats) of ``model`` on the held-out rows."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, rows.shape[0], batch_size):
        ids = rows[i : i + batch_size].to(device)
        with autocast(device):
            h = hidden_states(model, ids)
            logits = model.lm_head(h)[:, :-1].float()
        nll += float(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
        count += ids[:, 1:].numel()
    model.train(was_training)
    return nll / count


def ppl(nll: float) -> float:
    return math.exp(nll)
