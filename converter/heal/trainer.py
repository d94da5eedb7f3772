"""The Trainer: the student, its frozen teacher, the rows and the optimizer, with one method
per thing a run does to them (a step, an evaluation, going back to the best weights, a fresh
optimizer). What happens around the loop (keeping the best weights, the divergence guard,
--resume saves, logging, the progress bar) is in callbacks.py, called at fixed points: after
each step and after each evaluation (the first before any step, then every ``eval_every`` steps
and at the end)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import torch

from converter.heal.data import HealData
from converter.heal.distributed import (
    SINGLE,
    Launch,
    clip_and_average_grads,
    rank_rows,
    sums,
)
from converter.heal.loop import (
    CLIP,
    LoopState,
    TrainSettings,
    learning_rate,
    optimizer,
    restore,
    snapshot,
    trained,
)
from converter.heal.objective import Figures, autocast, distill_loss, held_out, hidden_states

log = logging.getLogger(__name__)


class Trainer:
    def __init__(
        self,
        student,
        teacher,
        data: HealData,
        cfg: TrainSettings,
        state: LoopState,
        callbacks: Sequence = (),
        launch: Launch = SINGLE,
    ) -> None:
        self.student, self.teacher = student, teacher
        self.launch = launch
        self.data, self.cfg, self.state = data, cfg, state
        self.callbacks = list(callbacks)
        self.params = trained(student)
        self.optimizer = optimizer(self.params)
        self.steps = data.steps(cfg.tokens, cfg.batch_size)
        self.per_step = cfg.batch_size * data.seqlen  # tokens
        self._started = time.time()

    def reset_optimizer(self) -> None:
        """A fresh AdamW (moments forgotten, sizes measured on the current weights)."""
        self.optimizer = optimizer(self.params)

    def go_back_to_best(self) -> None:
        restore(self.student, self.state.best)

    def weights(self) -> dict[str, torch.Tensor]:
        """A CPU fp32 copy of the trained weights as they are now."""
        return snapshot(self.params)

    def seconds(self) -> float:
        """Loop time so far, earlier interrupted runs included."""
        return self.state.seconds + time.time() - self._started

    def step(self, step: int) -> float:
        """Optimizer step ``step`` (0-based): its rows, its rate, one AdamW update (skipped when
        the loss is not finite). Returns the step's mean training KL. Under torchrun each rank
        takes its share of the global batch; the KL is averaged over ranks before it decides
        anything, so all ranks skip or step together."""
        cfg, n_rows = self.cfg, self.data.train.shape[0]
        epoch = step * cfg.batch_size // n_rows
        if step * cfg.batch_size % n_rows < cfg.batch_size and epoch > 0:
            log.info("pass %d over the training text begins", epoch + 1)
        rate = learning_rate(step, self.steps, cfg.lr) * self.state.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = rate * group["size"]
        ids = rank_rows(self.data.batch(step, cfg.batch_size), self.launch).to(cfg.device)
        with autocast(cfg.device, cfg.precision):
            with torch.no_grad():
                t_hidden = hidden_states(self.teacher, ids)
            s_hidden = hidden_states(self.student, ids)
        heads = (self.student.lm_head.weight, self.teacher.lm_head.weight)
        loss, kl = distill_loss(s_hidden, t_hidden, *heads, cfg.hidden_weight)
        kl = sums([kl], self.launch)[0] / self.launch.ranks
        if math.isfinite(kl):
            loss.backward()
            clip_and_average_grads(list(self.params.values()), CLIP, self.launch)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return kl

    def evaluate(self, step: int, train_kl: float | None) -> Figures:
        """The validation figures after ``step`` steps, added to the history; then each
        callback's on_evaluation."""
        cfg = self.cfg
        fig = held_out(
            self.student, self.data.validation, cfg.device, cfg.batch_size, cfg.precision,
            self.teacher, self.launch,
        )  # fmt: skip
        self.state.history.append(
            {
                "step": step,
                "tokens": step * self.per_step,
                "validation_nll": fig.nll,
                "validation_ppl": fig.ppl,
                "validation_kl": fig.kl,
                "train_kl": train_kl,
                "lr_scale": self.state.lr_scale,
                "seconds": round(self.seconds(), 1),
            }
        )
        for callback in self.callbacks:
            callback.on_evaluation(self, step, fig)
        return fig

    def fit(self) -> LoopState:
        """Run (or continue) the loop; on return the student holds its last weights and
        ``state.best`` the best ones."""
        state = self.state
        if not state.history:
            self.evaluate(0, None)
        self.student.train()
        for callback in self.callbacks:
            callback.on_train_start(self)
        kls: list[float] = []  # training KL since the last evaluation
        for step in range(state.step, self.steps):
            if state.stopped:
                break
            kl = self.step(step)
            kls.append(kl)
            for callback in self.callbacks:
                callback.on_step(self, step + 1, kl)
            last = step + 1 == self.steps or state.stopped
            if (step + 1) % self.cfg.eval_every == 0 or last:
                finite = [k for k in kls if math.isfinite(k)]
                state.step = step + 1
                self.evaluate(step + 1, sum(finite) / len(finite) if finite else math.nan)
                kls = []
        for callback in self.callbacks:
            callback.on_train_end(self)
        state.seconds += time.time() - self._started
        return state
