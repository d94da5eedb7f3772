"""Conversion methods: which calibration stream a method reads, and its list of stages.

``transmla`` is the method as published: statistics from the source model's own hidden states,
plain RoRoPE + balanced PCA, no compensation. ``refit`` adds a closed-form least-squares refit
of o_proj per layer; ``refit-recon`` (the default) then trains each converted layer's attention
toward the source's (at 128 KV elements on SmolLM2 it removes 45% of the loss ``refit`` leaves,
in about twice its time; docs/method.md section 6).
The ``sequential*`` variants calibrate on the converted model's own hidden states; on SmolLM2
they did not beat ``refit`` and are kept for comparison on other models. Every method but
``transmla`` ends with ``fp8_scales``: exact power-of-two rescalings that keep an fp8 latent
cache inside e4m3's range (it changes no output; ``transmla`` keeps the published tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

from converter.conversion.fp8_scaling import fp8_scales
from converter.conversion.reconstruct import Reconstruct
from converter.conversion.stages import (
    RefitOProj,
    assemble,
    choose_freqfold,
    kv_statistics,
    propagate_converted,
)
from converter.conversion.work import Stage


@dataclass(frozen=True)
class Method:
    name: str
    # "source": calibrate layer i on the source model's hidden states (published);
    # "converted": on the converted model's, so each layer sees the errors of the ones before.
    inputs: str
    stages: tuple[Stage, ...]
    description: str = ""

    @property
    def carries_converted_stream(self) -> bool:
        return self.inputs == "converted"


_CLOSED_FORM = (kv_statistics, choose_freqfold, assemble)
METHODS = {
    m.name: m
    for m in (
        Method(
            "transmla",
            "source",
            _CLOSED_FORM,
            "the published method: RoRoPE + balanced KV PCA on source activations",
        ),
        Method(
            "sequential",
            "converted",
            (*_CLOSED_FORM, fp8_scales, propagate_converted),
            "calibrate each layer on the converted model's hidden states",
        ),
        Method(
            "refit",
            "source",
            (*_CLOSED_FORM, RefitOProj("local"), fp8_scales),
            "published statistics + least-squares o_proj refit per layer",
        ),
        Method(
            "refit-recon",
            "source",
            (*_CLOSED_FORM, RefitOProj("local"), Reconstruct(), fp8_scales),
            "refit, then gradient reconstruction of each layer's attention output",
        ),
        Method(
            "sequential-refit",
            "converted",
            (*_CLOSED_FORM, RefitOProj("local"), fp8_scales, propagate_converted),
            "converted-stream calibration + local o_proj refit",
        ),
        Method(
            "sequential-global",
            "converted",
            (*_CLOSED_FORM, RefitOProj("global"), fp8_scales, propagate_converted),
            "converted-stream calibration + o_proj refit toward the source stream",
        ),
    )
}
DEFAULT_METHOD = "refit-recon"
