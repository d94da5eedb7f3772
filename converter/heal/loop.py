"""The training loop: AdamW on the trained weights with steps relative to each tensor's size, a
short warmup then cosine decay, the validation figures before training and every
``eval_every`` steps, the best weights kept (the starting ones count, so a run never ends worse
than it began on validation), and a guard that notices a run going wrong.

Steps relative to size: AdamW's step is about ``lr`` per parameter whatever the parameter's
scale, so with one absolute rate a tensor whose entries are 100x smaller than its neighbours'
(a latent rescaled for the fp8 cache, a bias-dominated latent feeding kv_b) changes 100x faster
relative to itself. Each tensor's rate is ``lr`` times its RMS (a bias: its weight's), as the
conversion's reconstruction stage does; rescaling a tensor then rescales its steps with it.

The guard: when the median training KL of the last GUARD_WINDOW steps exceeds GUARD_FACTOR
times the validation KL before training (or is not finite), the run goes back to its best
weights, forgets AdamW's moments and halves the rate; after MAX_BACKOFFS halvings it stops and
keeps the best weights. Every event is logged and reported.

Everything a step does is a function of the step number and the saved state (rows, rate,
guard window), so a run resumed from a saved evaluation point computes what the uninterrupted
run computes.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from converter.heal.data import HealData
from converter.heal.objective import autocast, distill_loss, held_out, hidden_states, ppl
from converter.math.schedule import warmup_cosine

log = logging.getLogger(__name__)
WARMUP = 0.05  # share of the steps spent warming the learning rate up
FLOOR = 0.1  # the cosine ends at this share of --lr
BETAS = (0.9, 0.95)
CLIP = 1.0
GUARD_WINDOW = 5  # training steps whose median KL the guard watches
GUARD_FACTOR = 4.0  # ... against this multiple of the validation KL before training
MAX_BACKOFFS = 3  # rate halvings before the run stops


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
    """Where a run is; what --resume saves at every evaluation (with the weights and moments)."""

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
    t = params[name].detach()
    rms = float(t.double().pow(2).mean().sqrt())
    return rms if rms > 0 else 1e-3


def optimizer(params: dict[str, torch.nn.Parameter]) -> torch.optim.AdamW:
    """AdamW with one group per tensor; each group's ``size`` multiplies the scheduled rate."""
    groups = [
        {"params": [p], "size": size_of(n, params), "name": n, "lr": 0.0} for n, p in params.items()
    ]
    return torch.optim.AdamW(groups, lr=0.0, betas=BETAS, weight_decay=0.0)


def _copy(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", torch.float32, copy=True) for n, p in params.items()}


def restore(model, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w)


def guard_tripped(state: LoopState) -> float | None:
    """The window's median KL when the guard trips (see the module docstring), else None."""
    window = state.recent_kl[-GUARD_WINDOW:]
    if window and not all(math.isfinite(k) for k in window):
        return math.inf
    if len(window) < GUARD_WINDOW or state.start_kl is None:
        return None
    median = statistics.median(window)
    return median if median > GUARD_FACTOR * max(state.start_kl, 1e-6) else None


Save = Callable[[LoopState, dict[str, torch.Tensor], dict], None]


def train(
    student,
    teacher,
    data: HealData,
    cfg: TrainSettings,
    state: LoopState,
    save: Save | None = None,
    resumed: tuple[dict[str, torch.Tensor], dict] | None = None,
) -> LoopState:
    """Run (or continue, from ``resumed`` = (weights, optimizer state)) the loop; on return the
    student holds its last weights and ``state.best`` the best ones."""
    params = trained(student)
    opt = optimizer(params)
    if resumed is not None:
        restore(student, resumed[0])
        opt.load_state_dict(resumed[1])
    steps = data.steps(cfg.tokens, cfg.batch_size)
    per_step = cfg.batch_size * data.seqlen
    started = time.time()

    def evaluate(step: int, train_kl: float | None) -> None:
        fig = held_out(student, data.validation, cfg.device, cfg.batch_size, cfg.precision, teacher)
        if state.start_kl is None:
            state.start_kl = fig.kl
        state.history.append(
            {
                "step": step,
                "tokens": step * per_step,
                "validation_nll": fig.nll,
                "validation_ppl": fig.ppl,
                "validation_kl": fig.kl,
                "train_kl": train_kl,
                "lr_scale": state.lr_scale,
                "seconds": round(state.seconds + time.time() - started, 1),
            }
        )
        if fig.nll < state.best_nll:
            state.best_nll, state.best_step, state.best = fig.nll, step, _copy(params)
        log.info(
            "step %d/%d (%d tokens): validation PPL %.3f, KL %.4f%s%s",
            step,
            steps,
            step * per_step,
            fig.ppl,
            fig.kl,
            "" if train_kl is None else f", train KL {train_kl:.4f}",
            " (best)" if state.best_step == step else "",
        )

    def back_off(step: int, median: float) -> None:
        """Back to the best weights with fresh moments and half the rate, or stop."""
        nonlocal opt
        event = {"step": step, "median_train_kl": median, "start_kl": state.start_kl}
        restore(student, state.best)
        state.recent_kl = []
        if len(state.events) >= cfg.max_backoffs:
            state.stopped = True
            event["action"] = f"stopped; kept step {state.best_step}"
            log.warning(
                "heal stopped at step %d: training KL %.3g is %.0fx the %.3g it started from, "
                "after %d halvings of the learning rate; the best weights (step %d) are kept",
                step,
                median,
                median / max(state.start_kl, 1e-12),
                state.start_kl,
                len(state.events),
                state.best_step,
            )
        else:
            state.lr_scale /= 2
            opt = optimizer(params)
            event["action"] = f"back to step {state.best_step}, learning rate x{state.lr_scale:g}"
            log.warning(
                "step %d: training KL %.3g is %.0fx the %.3g it started from: the run is "
                "diverging; back to the best weights (step %d), learning rate halved (now %g)",
                step,
                median,
                median / max(state.start_kl, 1e-12),
                state.start_kl,
                state.best_step,
                cfg.lr * state.lr_scale,
            )
        state.events.append(event)

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
        if state.stopped:
            break
        epoch = step * cfg.batch_size // n_rows
        if step * cfg.batch_size % n_rows < cfg.batch_size and epoch > 0:
            log.info("pass %d over the training text begins", epoch + 1)
        rate = learning_rate(step, steps, cfg.lr) * state.lr_scale
        for group in opt.param_groups:
            group["lr"] = rate * group["size"]
        ids = data.batch(step, cfg.batch_size).to(cfg.device)
        with autocast(cfg.device, cfg.precision):
            with torch.no_grad():
                t_hidden = hidden_states(teacher, ids)
            s_hidden = hidden_states(student, ids)
        heads = (student.lm_head.weight, teacher.lm_head.weight)
        loss, kl = distill_loss(s_hidden, t_hidden, *heads, cfg.hidden_weight)
        if math.isfinite(kl):
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params.values(), CLIP)
            opt.step()
        opt.zero_grad(set_to_none=True)
        kls.append(kl)
        state.recent_kl = [*state.recent_kl, kl][-GUARD_WINDOW:]
        bar.update(per_step)
        bar.set_postfix(kl=f"{kl:.4f}", best_ppl=f"{ppl(state.best_nll):.3f}")
        tripped = guard_tripped(state)
        if tripped is not None:
            back_off(step + 1, tripped)
        last = step + 1 == steps or state.stopped
        if (step + 1) % cfg.eval_every == 0 or last:
            finite = [k for k in kls if math.isfinite(k)]
            evaluate(step + 1, sum(finite) / len(finite) if finite else math.nan)
            kls = []
            state.step = step + 1
            if save is not None:
                save(state, _copy(params), opt.state_dict())
    bar.close()
    state.seconds += time.time() - started
    return state
