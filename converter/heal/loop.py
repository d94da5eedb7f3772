"""The training loop: AdamW on the trained weights, a short warmup then cosine decay, the
held-out perplexity before training and every ``eval_every`` steps, and the best weights kept
(the starting ones count, so a run never ends worse than it began).

Everything a step does is a function of the step number (rows, learning rate), so a run
resumed from a saved evaluation point computes what the uninterrupted run computes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from converter.heal.data import HealData
from converter.heal.objective import autocast, distill_loss, held_out_nll, hidden_states, ppl

log = logging.getLogger(__name__)
WARMUP = 0.05  # share of the steps spent warming the learning rate up
FLOOR = 0.1  # the cosine ends at this share of --lr
BETAS = (0.9, 0.95)
CLIP = 1.0


@dataclass(frozen=True)
class TrainSettings:
    tokens: int
    batch_size: int
    lr: float
    eval_every: int  # steps
    hidden_weight: float
    device: str
    precision: str = "fp32"  # "fp32" or "bf16" (autocast), already chosen for the device


@dataclass
class LoopState:
    """Where a run is; what --resume saves at every evaluation."""

    step: int = 0
    best_nll: float = math.inf
    best_step: int = 0
    best: dict[str, torch.Tensor] = field(default_factory=dict)  # trained weights, fp32, cpu
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0  # spent in earlier, interrupted runs
    optimizer: dict | None = None
    params: dict[str, torch.Tensor] | None = None  # trained weights at ``step``
    teacher_nll: float | None = None  # the teacher's held-out NLL, measured once


def learning_rate(step: int, steps: int, lr: float) -> float:
    warm = max(1, round(WARMUP * steps))
    if step < warm:
        return lr * (step + 1) / warm
    done = (step - warm) / max(1, steps - warm)
    return lr * (FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * done)))


def trained(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _copy(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", torch.float32, copy=True) for n, p in params.items()}


def restore(model, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)


def train(
    student,
    teacher,
    data: HealData,
    cfg: TrainSettings,
    state: LoopState,
    save: Callable[[LoopState], None] | None = None,
) -> LoopState:
    """Run (or continue) the loop; on return the student holds its last weights and
    ``state.best`` the best ones."""
    params = trained(student)
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, betas=BETAS, weight_decay=0.0)
    if state.params is not None:
        restore(student, state.params)
        opt.load_state_dict(state.optimizer)
    steps = data.steps(cfg.tokens, cfg.batch_size)
    per_step = cfg.batch_size * data.seqlen
    started = time.time()

    def evaluate(step: int, train_kl: float | None) -> None:
        nll = held_out_nll(student, data.held_out, cfg.device, cfg.batch_size, cfg.precision)
        state.history.append(
            {
                "step": step,
                "tokens": step * per_step,
                "held_out_nll": nll,
                "held_out_ppl": ppl(nll),
                "train_kl": train_kl,
                "seconds": round(state.seconds + time.time() - started, 1),
            }
        )
        if nll < state.best_nll:
            state.best_nll, state.best_step, state.best = nll, step, _copy(params)
        log.info(
            "step %d/%d (%d tokens): held-out PPL %.3f%s%s",
            step,
            steps,
            step * per_step,
            ppl(nll),
            "" if train_kl is None else f", train KL {train_kl:.4f}",
            " (best)" if state.best_step == step else "",
        )

    if not state.history:
        evaluate(0, None)
    student.train()
    bar = tqdm(
        total=steps * per_step,
        initial=state.step * per_step,
        unit="tok",
        unit_scale=True,
        desc="healing",
    )
    kls: list[float] = []
    n_rows = data.train.shape[0]
    for step in range(state.step, steps):
        epoch = step * cfg.batch_size // n_rows
        if step * cfg.batch_size % n_rows < cfg.batch_size and epoch > 0:
            log.info("pass %d over the training text begins", epoch + 1)
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps, cfg.lr)
        ids = data.batch(step, cfg.batch_size).to(cfg.device)
        with autocast(cfg.device, cfg.precision):
            with torch.no_grad():
                t_hidden = hidden_states(teacher, ids)
            s_hidden = hidden_states(student, ids)
            heads = (student.lm_head.weight, teacher.lm_head.weight)
            loss, kl = distill_loss(s_hidden, t_hidden, *heads, cfg.hidden_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        kls.append(kl)
        bar.update(per_step)
        bar.set_postfix(kl=f"{kl:.4f}", best_ppl=f"{ppl(state.best_nll):.3f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == steps:
            evaluate(step + 1, sum(kls) / len(kls))
            kls = []
            state.step = step + 1
            if save is not None:
                state.params, state.optimizer = _copy(params), opt.state_dict()
                save(state)
                state.params = state.optimizer = None
    bar.close()
    state.seconds += time.time() - started
    return state
