"""What happens around the heal loop, one callback each, called by the Trainer after every
step (``on_step``, with the number of steps done) and after every evaluation
(``on_evaluation``), in the order ``standard()`` lists them:

- ProgressBar: tokens done, the last training KL and the best validation PPL so far;
- DivergenceGuard: when the median training KL of the last GUARD_WINDOW steps exceeds
  GUARD_FACTOR times the validation KL before training (or is not finite), the run goes back to
  its best weights, forgets AdamW's moments and halves the rate; after ``max_backoffs`` halvings
  it stops and keeps the best weights. Every event is logged and reported;
- KeepBest: the weights of the best validation NLL so far (the starting ones count, so a run
  never ends worse than it began on validation);
- LogEvaluation: one line per evaluation;
- SaveProgress: --resume's save at every evaluation after the first (heal/state.py).
"""

from __future__ import annotations

import logging
import math
import statistics

from tqdm.auto import tqdm

from converter.heal.loop import LoopState
from converter.heal.objective import Figures, ppl
from converter.heal.state import HealStore

log = logging.getLogger(__name__)
GUARD_WINDOW = 5  # training steps whose median KL the guard watches
GUARD_FACTOR = 4.0  # ... against this multiple of the validation KL before training


class Callback:
    """No-op hooks; a callback overrides the ones it needs."""

    def on_train_start(self, trainer) -> None:
        """Before the first step of this run (after the first evaluation)."""

    def on_step(self, trainer, step: int, kl: float) -> None:
        """After optimizer step ``step`` (1-based: steps done), whose training KL is ``kl``."""

    def on_evaluation(self, trainer, step: int, fig: Figures) -> None:
        """After the validation figures ``fig`` at ``step`` steps were added to the history."""

    def on_train_end(self, trainer) -> None:
        """After the last step of this run."""


class ProgressBar(Callback):
    def on_train_start(self, trainer) -> None:
        self.bar = tqdm(
            total=trainer.steps * trainer.per_step,
            initial=trainer.state.step * trainer.per_step,
            unit="tok",
            unit_scale=True,
            desc="healing",
            disable=not trainer.launch.main,  # under torchrun rank 0 alone shows it
        )

    def on_step(self, trainer, step: int, kl: float) -> None:
        self.bar.update(trainer.per_step)
        self.bar.set_postfix(kl=f"{kl:.4f}", best_ppl=f"{ppl(trainer.state.best_nll):.3f}")

    def on_train_end(self, trainer) -> None:
        self.bar.close()


def guard_tripped(state: LoopState) -> float | None:
    """The window's median KL when the guard trips (see the module docstring), else None."""
    window = state.recent_kl[-GUARD_WINDOW:]
    if window and not all(math.isfinite(k) for k in window):
        return math.inf
    if len(window) < GUARD_WINDOW or state.start_kl is None:
        return None
    median = statistics.median(window)
    return median if median > GUARD_FACTOR * max(state.start_kl, 1e-6) else None


class DivergenceGuard(Callback):
    """Its window and events live in LoopState, so a resumed run guards as the uninterrupted
    one does."""

    def on_evaluation(self, trainer, step: int, fig: Figures) -> None:
        if trainer.state.start_kl is None:
            trainer.state.start_kl = fig.kl

    def on_step(self, trainer, step: int, kl: float) -> None:
        state = trainer.state
        state.recent_kl = [*state.recent_kl, kl][-GUARD_WINDOW:]
        median = guard_tripped(state)
        if median is not None:
            self.back_off(trainer, step, median)

    @staticmethod
    def back_off(trainer, step: int, median: float) -> None:
        """Back to the best weights with fresh moments and half the rate, or stop."""
        state, cfg = trainer.state, trainer.cfg
        event = {"step": step, "median_train_kl": median, "start_kl": state.start_kl}
        trainer.go_back_to_best()
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
            trainer.reset_optimizer()
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


class KeepBest(Callback):
    def on_evaluation(self, trainer, step: int, fig: Figures) -> None:
        state = trainer.state
        if fig.nll < state.best_nll:
            state.best_nll, state.best_step, state.best = fig.nll, step, trainer.weights()


class LogEvaluation(Callback):
    def on_evaluation(self, trainer, step: int, fig: Figures) -> None:
        train_kl = trainer.state.history[-1]["train_kl"]
        log.info(
            "step %d/%d (%d tokens): validation PPL %.3f, KL %.4f%s%s",
            step,
            trainer.steps,
            step * trainer.per_step,
            fig.ppl,
            fig.kl,
            "" if train_kl is None else f", train KL {train_kl:.4f}",
            " (best)" if trainer.state.best_step == step else "",
        )


class SaveProgress(Callback):
    """Save at every evaluation that follows a step (the one before training is measured again
    by a run that finds nothing saved)."""

    def __init__(self, store: HealStore) -> None:
        self.store = store

    def on_evaluation(self, trainer, step: int, fig: Figures) -> None:
        if step > 0:
            self.store.save(trainer)


def standard(store: HealStore | None = None) -> list[Callback]:
    """heal's callbacks, in the order they run; SaveProgress only with a --resume store."""
    callbacks = [ProgressBar(), DivergenceGuard(), KeepBest(), LogEvaluation()]
    return callbacks + ([SaveProgress(store)] if store is not None else [])
