"""The two models of a run, loaded: the teacher frozen, the student with the weights it trains
in fp32 and the rest frozen."""

from __future__ import annotations

import torch

from converter.heal.inputs import HealPair
from converter.heal.memory import trainable_names
from transmla_vllm.checkpoint_format import CheckpointLayout


def load_models(
    pair: HealPair, train: str, device: str, precision: str, checkpointing: bool = True
) -> tuple:
    """(teacher, student): fp32 on a CPU (bf16 autocast casts as it goes); bf16 on a GPU when
    training in bf16, with the trained weights kept in fp32."""
    from transformers import AutoModelForCausalLM

    from converter.remote_code.modeling_transmla import TransMLAForCausalLM

    dtype = torch.bfloat16 if device != "cpu" and precision == "bf16" else torch.float32
    teacher = AutoModelForCausalLM.from_pretrained(pair.teacher, dtype=dtype).to(device).eval()
    teacher.requires_grad_(False)
    student = TransMLAForCausalLM.from_pretrained(pair.student, dtype=dtype).to(device)
    layout = CheckpointLayout.from_config(pair.student_config)
    return teacher, make_trainable(student, trainable_names(layout, train), checkpointing)


def make_trainable(student, names: list[str], checkpointing: bool = True):
    """Train ``names`` (kept in fp32), freeze the rest; with ``checkpointing`` keep only each
    layer's input for the backward pass."""
    wanted = set(names)
    for name, p in student.named_parameters():
        p.requires_grad_(name in wanted)
        if name in wanted:
            p.data = p.data.float()
    if checkpointing:
        kwargs = {"use_reentrant": False}
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return student
