"""The distillation objective and the held-out measure.

Loss: KL(teacher || student) of the next-token laws, averaged over every position, optionally
plus a hidden-state term (mean squared difference of the final normed hidden states, relative
to the teacher's mean square). The logits are made loss_chunk() positions at a time and turned
into their gradients at once (ChunkedKL), so a step never holds [batch, seqlen, vocab] logits
(1 GB per 2048 tokens at Llama-3's 128k vocabulary), only one chunk's.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from converter.heal.distributed import SINGLE, Launch, forwards_per_rank, rank_rows, sums

# fp32 logits that exist at once: a CPU works fastest on chunks that stay near its caches
# (SmolLM2, 2048 positions: 6.5 s per step at 2048 positions a chunk, about 2 s at 128);
# a GPU wants large ones
LOSS_CHUNK_BYTES = {"cpu": 24 * 2**20, "cuda": 2**30}


def loss_chunk(vocab_size: int, device: str) -> int:
    """Positions whose logits the loss makes at once."""
    budget = LOSS_CHUNK_BYTES["cpu" if device == "cpu" else "cuda"]
    return max(16, budget // (4 * vocab_size))


def fast_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 in AMX tiles (Xeon Sapphire Rapids and later), where
    bf16 autocast makes a heal step faster (docs/benchmarks.md "heal_step" measures by how
    much); elsewhere bf16 on a CPU is slow."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe is not None and probe())


def choose_precision(precision: str, device: str) -> str:
    """--precision auto: bf16 autocast on a GPU and on a CPU with AMX, fp32 elsewhere."""
    if precision != "auto":
        return precision
    return "bf16" if device != "cpu" or fast_cpu_bf16() else "fp32"


def autocast(device: str, precision: str) -> contextlib.AbstractContextManager:
    """Matmuls in bf16 (weights kept as they are) for "bf16"; nothing for "fp32"."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cpu" if device == "cpu" else "cuda", dtype=torch.bfloat16)


def eval_precision(device: str, precision: str) -> str:
    """Held-out figures on a CPU are fp32 whatever the training ran in, so they compare with
    ``converter eval`` and the benchmarks; a GPU evaluates as it trains."""
    return "fp32" if device == "cpu" else precision


def hidden_states(model, ids: torch.Tensor) -> torch.Tensor:
    """Final (normed) hidden states of a causal LM, before its head."""
    return model.model(input_ids=ids, use_cache=False).last_hidden_state


class ChunkedKL(torch.autograd.Function):
    """Sum over positions of KL(teacher || student), the student's gradients made in the same
    pass.

    For one position the gradient of KL with respect to the student's logits is
    softmax(student) - softmax(teacher), so each chunk of loss_chunk() positions turns into
    gradients for the hidden states (and for the head, when it trains) while its logits exist,
    and nothing of them is kept: the backward pass is a multiplication, where autograd would
    recompute the chunk's logits (two vocabulary-wide matmuls, most of a small model's step).
    """

    @staticmethod
    def forward(ctx, s_hidden, t_hidden, s_head, t_head):  # noqa: D102
        # logits and the KL in fp32 (fp64 in tests) whatever the step's autocast: bf16 logits
        # of a 49k-128k vocabulary round the law the loss compares
        with torch.autocast(s_hidden.device.type, enabled=False):
            return ChunkedKL._forward(ctx, s_hidden, t_hidden, s_head, t_head)

    @staticmethod
    def _forward(ctx, s_hidden, t_hidden, s_head, t_head):
        want_hidden, want_head = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        grad_hidden = torch.zeros_like(s_hidden) if want_hidden else None
        wide = torch.promote_types(s_hidden.dtype, torch.float32)  # fp32, or fp64 in tests
        wide = torch.promote_types(wide, s_head.dtype)
        grad_head = torch.zeros_like(s_head, dtype=wide) if want_head else None
        total = torch.zeros((), dtype=wide, device=s_hidden.device)
        chunk = loss_chunk(s_head.shape[0], s_hidden.device.type)
        s_wide, t_wide = s_head.to(wide), t_head.to(wide)  # no copy for fp32 heads (cpu)
        for i in range(0, s_hidden.shape[0], chunk):
            part = slice(i, i + chunk)
            s_logp = F.linear(s_hidden[part].to(wide), s_wide).log_softmax(-1)
            t_logp = F.linear(t_hidden[part].to(wide), t_wide).log_softmax(-1)
            t_p = t_logp.exp()
            total += (t_p * (t_logp - s_logp)).sum()
            if want_hidden or want_head:
                diff = s_logp.exp_().sub_(t_p)  # d KL / d student logits
                if want_hidden:
                    grad_hidden[part] = (diff @ s_wide).to(grad_hidden.dtype)
                if want_head:
                    grad_head += diff.t() @ s_hidden[part].to(wide)
        ctx.save_for_backward(grad_hidden, grad_head)
        ctx.head_dtype = s_head.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):  # noqa: D102
        grad_hidden, grad_head = ctx.saved_tensors
        hidden = None if grad_hidden is None else grad_total * grad_hidden
        head = None if grad_head is None else (grad_total * grad_head).to(ctx.head_dtype)
        return hidden, None, head, None


def distill_loss(
    s_hidden: torch.Tensor,
    t_hidden: torch.Tensor,
    s_head: torch.Tensor,
    t_head: torch.Tensor,
    hidden_weight: float = 0.0,
) -> tuple[torch.Tensor, float]:
    """(loss to minimise, mean KL per position in nats)."""
    s, t = s_hidden.flatten(0, 1), t_hidden.detach().flatten(0, 1)
    kl = ChunkedKL.apply(s, t, s_head, t_head) / s.shape[0]
    loss = kl
    if hidden_weight:
        scale = t.float().pow(2).mean()
        loss = loss + hidden_weight * (s.float() - t.float()).pow(2).mean() / scale
    return loss, float(kl.detach())


def logits(model, ids: torch.Tensor, device: str, precision: str) -> torch.Tensor:
    """Next-token logits of ``model`` for ``ids`` in fp32, its forward in ``precision``."""
    with autocast(device, precision):
        h = hidden_states(model, ids.to(device))
    with torch.autocast(h.device.type, enabled=False):
        return F.linear(h.float(), model.lm_head.weight.float())


@dataclass(frozen=True)
class Figures:
    """Mean next-token NLL of the student on some rows, and its KL from the teacher there."""

    nll: float
    kl: float | None = None  # nats per position; None when no teacher was given

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


@torch.no_grad()
def held_out(
    model,
    rows: torch.Tensor,
    device: str,
    batch_size: int,
    precision: str = "fp32",
    teacher=None,
    launch: Launch = SINGLE,
) -> Figures:
    """``model``'s figures on held-out ``rows``, its forward (and the teacher's) in the
    evaluation precision (eval_precision); logits, NLL and KL in fp32. Under torchrun each rank
    measures its share of the rows (``batch_size`` is the global batch) and the sums are
    reduced, so every rank returns the figures of all rows."""
    was_training = model.training
    model.eval()
    numerics = eval_precision(device, precision)
    mine = rank_rows(rows, launch)
    per = max(1, batch_size // launch.ranks)
    nll = kl = 0.0
    count = 0
    for f in range(forwards_per_rank(rows.shape[0], per, launch)):
        ids = mine[f * per : (f + 1) * per]
        dummy = ids.shape[0] == 0
        ids = (rows[:1] if dummy else ids).to(device)
        s_logp = logits(model, ids, device, numerics)[:, :-1].log_softmax(-1)
        t_logp = None
        if teacher is not None:
            t_logp = logits(teacher, ids, device, numerics)[:, :-1].log_softmax(-1)
        if dummy:
            continue
        target = ids[:, 1:]
        nll -= float(s_logp.gather(-1, target[..., None]).sum())
        if t_logp is not None:
            kl += float((t_logp.exp() * (t_logp - s_logp)).sum())
        count += target.numel()
    model.train(was_training)
    nll, kl, count = sums([nll, kl, float(count)], launch)
    return Figures(nll / count, kl / count if teacher is not None else None)


def ppl(nll: float) -> float:
    return math.exp(nll)
