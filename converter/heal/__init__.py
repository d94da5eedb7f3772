"""Heal: distil the source model (teacher) into its converted checkpoint (student).

The conversion is closed-form and layer-local; a short end-to-end distillation (KL between the
two next-token laws on real text) recovers most of what it loses. Same checkpoint format in and
out, so the plugin serves a healed folder unchanged.

    options.py    HealOptions (the one home of the defaults), choices (no torch: --help stays fast)
    checks.py     the flags, refused in one sentence before any file is read
    data.py       text -> training sequences and a held-out slice kept out of every pass
    inputs.py     the teacher / student pair, checked before anything heavy
    memory.py     what a run needs, estimated up front and refused when it cannot fit
    models.py     the two models loaded: teacher frozen, student's trained weights in fp32
    shared.py     one copy of the tensors teacher and student share
    distributed.py  under torchrun: the process group, FSDP2 shards, the reductions
    objective.py  the distillation loss and the held-out perplexity
    precision.py  whether bf16 trains against the teacher the run measures
    fp8.py        the fp8 cache scales taken out before training and chosen again after
    baseline.py   what the run starts from, measured once
    loop.py       the loop's settings, state, schedule and optimizer
    trainer.py    the Trainer: a step, an evaluation, the loop that calls the callbacks
    callbacks.py  around the loop: best weights, divergence guard, --resume saves, progress
    state.py      --resume: the loop's state in the resume folder (torch.distributed.checkpoint)
    finish.py     what is written: the kept weights as written, or the input's
    summary.py    the report's heal entry
    output.py     the healed folder: shards, config, report, card
    run.py        heal() and convert-then-heal: the above, in order
"""

__all__ = ["HealOptions", "convert_and_heal", "heal"]


def __getattr__(name: str):
    """Import run.py (torch, transformers) on first use, not with converter.heal.options."""
    if name == "HealOptions":
        from converter.heal.options import HealOptions

        return HealOptions
    if name in __all__:
        from converter.heal import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
