"""One copy of what teacher and student share.

A conversion copies the embeddings, norms, MLP and head (and a q/k-normed layer's projections)
from the source unchanged, and with ``--train attention`` heal never changes them: the student
would hold a second copy of most of the teacher (6.7 of Llama-3.1-8B's 8.2B weights, 13 GB in
bf16). Each candidate pair (CheckpointLayout.kept_from_source) is compared with torch.equal once
loaded, never assumed equal, and a frozen student tensor equal to the teacher's is replaced by
the teacher's: the models then read the same storage. A trained tensor, one that differs (a
student converted from other weights, another dtype) or one a model names otherwise stays the
student's own.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SharingReport:
    shared: list[str]  # student tensors that are now the teacher's
    kept: dict[str, str] = field(default_factory=dict)  # student tensor -> why it is its own
    shared_bytes: int = 0

    def describe(self) -> str:
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(self.reasons().items()))
        return (
            f"{len(self.shared)} student tensors share the teacher's copy "
            f"({self.shared_bytes / 1e9:.3f} GB held once); {len(self.kept)} kept separate"
            + (f" ({why})" if why else "")
        )

    def reasons(self) -> dict[str, int]:
        return dict(Counter(self.kept.values()))

    def as_report(self) -> dict:
        differing = sorted(n for n, reason in self.kept.items() if reason == DIFFERS)
        return {
            "shared_tensors": len(self.shared),
            "shared_bytes": self.shared_bytes,
            "kept_separate": len(self.kept),
            "kept_because": self.reasons(),
            "differing": differing[:10],
        }


TRAINED = "trained"
DIFFERS = "differ from the teacher's"
ABSENT = "absent from one of the models"
OTHER_KIND = "of another shape, dtype or device"


def _holders(model) -> dict[int, list[tuple[torch.nn.Module, str]]]:
    """Every (module, attribute) holding each parameter, by id (a tied head and embedding are
    one parameter held twice)."""
    out: dict[int, list] = {}
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((module, key))
    return out


@torch.no_grad()
def share_frozen(teacher, student, candidates: dict[str, str]) -> SharingReport:
    """Make each frozen student tensor of ``candidates`` (student name -> teacher name) that is
    equal to the teacher's that very tensor (see the module docstring)."""
    mine = dict(student.named_parameters())
    theirs = dict(teacher.named_parameters(remove_duplicate=False))
    holders = _holders(student)
    shared, kept, nbytes = [], {}, 0
    for name, source in candidates.items():
        p, t = mine.get(name), theirs.get(source)
        if p is None or t is None:
            kept[name] = ABSENT
        elif p.requires_grad:
            kept[name] = TRAINED
        elif (p.shape, p.dtype, p.device) != (t.shape, t.dtype, t.device):
            kept[name] = OTHER_KIND
        elif not torch.equal(p, t):
            kept[name] = DIFFERS
        else:
            for module, key in holders[id(p)]:
                module._parameters[key] = t
            shared.append(name)
            nbytes += t.numel() * t.element_size()
    report = SharingReport(shared, kept, nbytes)
    log.info("%s", report.describe())
    return report
