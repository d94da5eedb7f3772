"""The pieces a heal step is made of: the settings, the state a run carries from one
evaluation to the next (what --resume saves), the learning-rate schedule and the optimizer.

AdamW on the trained weights with steps relative to each tensor's size, a short warmup then
cosine decay. Steps relative to size: AdamW's step is about ``lr`` per parameter whatever the
parameter's scale, so with one absolute rate a tensor whose entries are 100x smaller than its
neighbours' (a latent rescaled for the fp8 cache, a bias-dominated latent feeding kv_b) changes
100x faster relative to itself. Each tensor's rate is ``lr`` times its RMS (a bias: its
weight's), as the conversion's reconstruction stage does; rescaling a tensor then rescales its
steps with it.

Everything a step does is a function of the step number and LoopState (rows, rate, guard
window), so a run resumed from a saved evaluation point computes what the uninterrupted run
computes. The loop itself is trainer.py; what happens around it, callbacks.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from converter.heal.distributed import full, like, local
from converter.math.schedule import warmup_cosine

WARMUP = 0.05  # share of the steps spent warming the learning rate up
FLOOR = 0.1  # the cosine ends at this share of --lr
BETAS = (0.9, 0.95)
CLIP = 1.0
MAX_BACKOFFS = 3  # rate halvings before the run stops (callbacks.DivergenceGuard)


@dataclass(frozen=True)
class TrainSettings:
    tokens: int
    batch_size: int
    lr: float  # peak step relative to each tensor's RMS
    eval_every: int  # steps
    hidden_weight: float
    device: str
    precision: str = "fp32"  # "fp32" or "bf16" (autocast), already chosen for the device
    max_backoffs: int = MAX_BACKOFFS


@dataclass
class LoopState:
    """Where a run is; what --resume saves at every evaluation (with the weights and moments).
    Every field is carried from one evaluation to the next; nothing here is scratch."""

    step: int = 0
    best_nll: float = math.inf  # validation
    best_step: int = 0
    best: dict[str, torch.Tensor] = field(default_factory=dict)  # trained weights, fp32, cpu
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0  # spent in earlier, interrupted runs
    start_kl: float | None = None  # validation KL(teacher || student) before training
    lr_scale: float = 1.0  # halved by each guard event
    recent_kl: list[float] = field(default_factory=list)  # the guard's window
    events: list[dict] = field(default_factory=list)
    stopped: bool = False
    # measured once before training (teacher and input figures, the precision check), so a
    # resumed run reports them without measuring again
    before: dict = field(default_factory=dict)


def learning_rate(step: int, steps: int, lr: float, warmup: float = WARMUP) -> float:
    """Linear warmup over ``warmup`` of the steps, then a cosine down to FLOOR x ``lr``."""
    warm = max(1, round(warmup * steps))
    return lr * warmup_cosine(step, steps, warm, FLOOR, cosine_from=warm)


def trained(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def size_of(name: str, params: dict[str, torch.Tensor]) -> float:
    """RMS a tensor's steps are relative to: its own, a bias's weight's (a bias is often near
    zero, or a few entries near 100 in Qwen2.5, neither of which says how far it should move)."""
    if name.endswith(".bias"):
        weight = params.get(name[: -len("bias")] + "weight")
        if weight is not None:
            name = name[: -len("bias")] + "weight"
    t = full(params[name].detach())  # the whole tensor's RMS on every rank
    rms = float(t.double().pow(2).mean().sqrt())
    return rms if rms > 0 else 1e-3


def optimizer(params: dict[str, torch.nn.Parameter]) -> torch.optim.AdamW:
    """AdamW with one group per tensor; each group's ``size`` multiplies the scheduled rate."""
    groups = [
        {"params": [p], "size": size_of(n, params), "name": n, "lr": 0.0} for n, p in params.items()
    ]
    return torch.optim.AdamW(groups, lr=0.0, betas=BETAS, weight_decay=0.0)


def snapshot(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of ``params`` in fp32 on the CPU (the best weights, a --resume save); under
    torchrun this rank's shards, which only ``restore`` puts back."""
    return {n: local(p.detach()).to("cpu", torch.float32, copy=True) for n, p in params.items()}


def restore(model, weights: dict[str, torch.Tensor]) -> None:
    """Put back what ``snapshot`` took (this rank's shards under torchrun)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, w in weights.items():
            local(params[n]).copy_(w)


def restore_full(model, weights: dict[str, torch.Tensor]) -> None:
    """Put back whole tensors (the input's, read from its files): each rank keeps its part."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, w in weights.items():
            local(params[n]).copy_(like(w, params[n]))
