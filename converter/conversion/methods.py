"""Conversion methods: what the calibration sees and what is refit after the PCA.

``transmla`` is the method as published: statistics from the source model's own hidden states,
plain RoRoPE + balanced PCA, no compensation. ``refit`` (the default) adds a closed-form
least-squares refit of o_proj per layer; it is what measurably helps (docs/benchmarks.md).
The ``sequential*`` variants calibrate on the converted model's own hidden states; on SmolLM2
they did not beat ``refit`` and are kept for comparison on other models.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    # "source": calibrate layer i on the source model's hidden states (published);
    # "converted": on the converted model's, so each layer sees the errors of the ones before.
    inputs: str
    # o_proj least-squares refit target: None (no refit); "local": the source attention on the
    # same inputs; "global": the source attention on the source stream plus the drift of the
    # converted stream, so the refit also pulls the residual stream back toward the source.
    refit_o: str | None
    ridge: float = 1e-3
    description: str = ""


METHODS = {
    m.name: m for m in (
        Method("transmla", "source", None,
               description="the published method: RoRoPE + balanced KV PCA on source activations"),
        Method("sequential", "converted", None,
               description="calibrate each layer on the converted model's hidden states"),
        Method("refit", "source", "local",
               description="published statistics + least-squares o_proj refit per layer"),
        Method("sequential-refit", "converted", "local",
               description="converted-stream calibration + local o_proj refit"),
        Method("sequential-global", "converted", "global",
               description="converted-stream calibration + o_proj refit toward the source stream"),
    )
}
DEFAULT_METHOD = "refit"
