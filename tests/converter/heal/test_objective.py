"""The distillation loss: ChunkedKL's value and its hand-made gradients match autograd through
torch's own KL, however the positions are chunked, for the hidden states and the head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from converter.heal import objective
from converter.heal.objective import (
    choose_precision,
    distill_loss,
    eval_precision,
    loss_chunk,
)


def _reference(s, t, s_head, t_head, hidden_weight):
    s_logp = F.linear(s, s_head).log_softmax(-1)
    t_logp = F.linear(t, t_head).log_softmax(-1)
    kl = F.kl_div(s_logp.flatten(0, 1), t_logp.flatten(0, 1), log_target=True, reduction="sum")
    kl = kl / (s.shape[0] * s.shape[1])
    mse = (s - t).pow(2).mean() / t.pow(2).mean()
    return kl + hidden_weight * mse


@pytest.mark.parametrize("chunk_bytes", [16, 4 * 50 * 7, 2**30])  # 16 positions, 7, all
@pytest.mark.parametrize("hidden_weight", [0.0, 0.5])
def test_chunked_kl_matches_autograd(monkeypatch, chunk_bytes, hidden_weight):
    monkeypatch.setitem(objective.LOSS_CHUNK_BYTES, "cpu", chunk_bytes)
    g = torch.Generator().manual_seed(0)
    shape, vocab = (3, 11, 8), 50
    s = torch.randn(shape, generator=g, dtype=torch.float64)
    t = s + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    s_head = torch.randn(vocab, 8, generator=g, dtype=torch.float64)
    t_head = s_head + 0.1 * torch.randn(vocab, 8, generator=g, dtype=torch.float64)

    ours_in = [s.clone().requires_grad_(), s_head.clone().requires_grad_()]
    loss, kl = distill_loss(ours_in[0], t, ours_in[1], t_head, hidden_weight)
    (2.5 * loss).backward()
    ref_in = [s.clone().requires_grad_(), s_head.clone().requires_grad_()]
    ref = _reference(ref_in[0], t, ref_in[1], t_head, hidden_weight)
    (2.5 * ref).backward()

    assert kl > 0.01
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    for ours, theirs in zip(ours_in, ref_in, strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-6, atol=1e-9)


def test_frozen_head_gets_no_gradient_and_chunks_follow_the_vocabulary():
    s = torch.randn(2, 5, 4, requires_grad=True)
    head = torch.randn(30, 4)
    loss, _ = distill_loss(s, s.detach() * 0.5, head, head)
    loss.backward()
    assert head.grad is None and s.grad is not None and s.grad.abs().sum() > 0
    assert loss_chunk(49152, "cpu") == 24 * 2**20 // (4 * 49152)
    assert loss_chunk(128256, "cpu") < loss_chunk(49152, "cpu") < loss_chunk(49152, "cuda")


@pytest.mark.parametrize("amx,cpu_auto", [(True, "bf16"), (False, "fp32")])
def test_precision_auto_follows_the_device(monkeypatch, amx, cpu_auto):
    monkeypatch.setattr(objective, "fast_cpu_bf16", lambda: amx)
    assert choose_precision("auto", "cpu") == cpu_auto
    assert choose_precision("auto", "cuda") == "bf16"
    assert choose_precision("fp32", "cuda") == "fp32" and choose_precision("bf16", "cpu") == "bf16"
    assert eval_precision("cpu", "bf16") == "fp32" and eval_precision("cuda", "bf16") == "bf16"


def test_logits_and_kl_stay_fp32_under_bf16_autocast():
    """The training step runs its forward passes under bf16 autocast; the loss must still make
    its logits and KL in fp32 (bf16 logits of a real vocabulary round the laws it compares:
    1e-2 relative error in the KL here)."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 64, 96, generator=g)
    t = s + 0.2 * torch.randn(2, 64, 96, generator=g)
    s_head = 0.5 * torch.randn(4000, 96, generator=g)
    t_head = s_head + 0.05 * torch.randn(4000, 96, generator=g)
    s_in = s.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, kl = distill_loss(s_in, t, s_head, t_head)
    loss.backward()
    ref_in = s.double().requires_grad_()
    ref = _reference(ref_in, t.double(), s_head.double(), t_head.double(), 0.0)
    ref.backward()
    assert loss.dtype == torch.float32
    assert kl == pytest.approx(float(ref), rel=1e-5)
    torch.testing.assert_close(s_in.grad.double(), ref_in.grad, rtol=1e-3, atol=1e-6)
