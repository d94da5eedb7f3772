"""What one layer's conversion reads, changes and produces, as its stages pass it along.

- ``LayerInputs`` (fixed): the source layer, the calibration streams entering it and their
  split into training and held-out chunks, and the source attention's output on them.
- ``LayerTarget`` (fixed): what the converted layer must be: rope width, latent rank, the
  FreqFold asked for, its config and rope tables.
- ``ConvertedAttention``: the converted attention tensors and the converted layer that runs
  them. It is the one thing stages change after it is made, and only through ``set`` (new
  values for some tensors) and ``trainable`` (parameters to optimise, then ``set``), which keep
  the tensors the writer reads and the layer the later stages run in step.
- ``LayerWork``: the inputs, the target and each stage's products. A stage takes a LayerWork
  and returns a new one with what it produced, report entries included (``add``); each product
  and report entry has one producer, so no stage overwrites what another made.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, Protocol

import torch
from torch import nn

from converter.conversion.converted_layer import ConvertedRunner, converted_layer
from converter.sources.spec import SourceSpec
from transmla_vllm.checkpoint_format import CONVERTED_ATTENTION


@dataclass(frozen=True)
class LayerInputs:
    """What the source layer and the calibration give one layer's conversion."""

    index: int
    layer: nn.Module  # the source decoder layer (transformers' own class)
    spec: SourceSpec
    rope: tuple[torch.Tensor, torch.Tensor]  # the source layer's rope tables
    h_src: torch.Tensor  # source stream entering the layer [N, T, D]
    h_conv: torch.Tensor | None  # converted stream, for methods that carry it
    stream: str  # "source" or "converted": the stream statistics and fits read
    n_train: int  # chunks [0, n_train) give statistics; the rest are held out
    batch: int
    device: str

    @property
    def h_in(self) -> torch.Tensor:
        """The stream statistics and fits read (all chunks)."""
        return self.h_conv if self.stream == "converted" else self.h_src

    @property
    def train(self) -> torch.Tensor:
        return self.h_in[: self.n_train]

    @property
    def held_out(self) -> torch.Tensor:
        return self.h_in[self.n_train :]

    @property
    def n_held_out(self) -> int:
        return self.h_in.shape[0] - self.n_train

    def source_attention(self, h: torch.Tensor) -> torch.Tensor:
        """The source layer's attention output for residual stream ``h``."""
        x = self.layer.input_layernorm(h)
        return self.layer.self_attn(
            hidden_states=x, attention_mask=None, position_embeddings=self.rope
        )[0]


@dataclass(frozen=True)
class LayerTarget:
    """What the converted layer must be."""

    rope_dim: int
    kv_lora_rank: int
    freqfold: int | None  # asked for; None: "auto", chosen on held-out chunks
    mla_config: Any  # DeepseekV3Config of the converted layers
    conv_rope: tuple[torch.Tensor, torch.Tensor]  # the converted layer's rope tables


@dataclass(frozen=True)
class FreqFold:
    """The FreqFold a layer is built with; with the held-out error of every candidate when it
    was chosen on held-out chunks."""

    fold: int
    held_out_error: dict[int, float] | None = None


class ConvertedAttention:
    """One layer's converted attention tensors (DeepSeek names, fp32 on the CPU: what the
    writer reads) and the converted decoder layer that runs them (built on first use, with the
    source's own norms and MLP)."""

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        source_layer: nn.Module,
        config: Any,
        index: int,
        rope: tuple[torch.Tensor, torch.Tensor],
        device: str,
    ) -> None:
        self._tensors = dict(tensors)
        self._source_layer, self._config, self._index = source_layer, config, index
        self._rope, self._device = rope, device
        self._runner: ConvertedRunner | None = None

    @classmethod
    def build(
        cls, tensors: Mapping[str, torch.Tensor], inputs: LayerInputs, target: LayerTarget
    ) -> ConvertedAttention:
        return cls(
            tensors, inputs.layer, target.mla_config, inputs.index, target.conv_rope, inputs.device
        )

    @property
    def tensors(self) -> Mapping[str, torch.Tensor]:
        """The current tensors, read-only (change them with ``set``)."""
        return MappingProxyType(self._tensors)

    def runner(self) -> ConvertedRunner:
        """The converted layer running the current tensors."""
        if self._runner is None:
            conv = converted_layer(
                self._source_layer, self._tensors, self._config, self._index, self._device
            )
            self._runner = ConvertedRunner(conv, self._rope)
        return self._runner

    def set(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """``tensors`` become these names' values: fp32 on the CPU for the writer, and new
        frozen parameters in the converted layer. New parameters, never ``copy_``: before the
        o_proj refit the converted layer's o_proj IS the source layer's (no copy on CPU), and
        writing into it would change the source stream the next layer is calibrated on."""
        for name, tensor in tensors.items():
            if name not in self._tensors:
                raise KeyError(f"{name} is not one of this layer's attention tensors")
            tensor = tensor.to("cpu", torch.float32).contiguous()
            self._tensors[name] = tensor
            if self._runner is not None:
                module, attr = self._module(name)
                setattr(module, attr, nn.Parameter(tensor.to(self._device), requires_grad=False))

    def trainable(self) -> dict[str, nn.Parameter]:
        """Trainable fp32 copies, on the device, of the tensors the conversion computed
        (``CONVERTED_ATTENTION``; the kept source projections and norms of a q/k-normed layer
        stay frozen, like every other attention parameter), put in the converted layer in
        their place. Copies: a tensor may be the source layer's own (o_proj before a refit, on
        CPU), which must not move. The tensors the writer reads stay as they were until
        ``set``."""
        attn = self.runner().conv.self_attn
        for p in attn.parameters():
            p.requires_grad_(False)
        params = {}
        for name in CONVERTED_ATTENTION:
            if name in self._tensors:
                t = self._tensors[name]
                params[name] = nn.Parameter(t.to(self._device, torch.float32, copy=True))
                module, attr = self._module(name)
                setattr(module, attr, params[name])
        return params

    def _module(self, name: str) -> tuple[nn.Module, str]:
        """'self_attn.q_proj.weight' -> (the converted layer's q_proj, 'weight')."""
        path, attr = name.rsplit(".", 1)
        return self.runner().conv.get_submodule(path), attr


@dataclass(frozen=True)
class LayerWork:
    """One layer in conversion: its inputs and target, and what the stages produced so far."""

    inputs: LayerInputs
    target: LayerTarget
    kv_gram: torch.Tensor | None = None  # kv_statistics: second moment of [k; v], fp64
    freqfold: FreqFold | None = None  # choose_freqfold
    attention: ConvertedAttention | None = None  # assemble (then changed through its methods)
    next_conv: torch.Tensor | None = None  # propagate_converted: the next layer's h_conv
    report: Mapping[str, Any] = field(default_factory=dict)

    def add(self, report: Mapping[str, Any] | None = None, **products: Any) -> LayerWork:
        """This work with a stage's ``products`` and ``report`` entries; one already produced
        by an earlier stage is refused."""
        for name, value in products.items():
            if name not in _PRODUCTS:
                raise TypeError(f"{name!r} is not a stage product of LayerWork")
            if getattr(self, name) is not None or value is None:
                raise ValueError(f"layer {self.inputs.index}: {name} produced twice, or as None")
        report = dict(report or {})
        twice = report.keys() & self.report.keys()
        if twice:
            raise ValueError(f"layer {self.inputs.index}: report entries {sorted(twice)} twice")
        return replace(self, report={**self.report, **report}, **products)

    def need(self, name: str) -> Any:
        """Product ``name``, which an earlier stage must have made."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(
                f"layer {self.inputs.index}: a stage needs {name}, which no earlier stage of "
                "this method produced"
            )
        return value


_PRODUCTS = {f.name for f in fields(LayerWork)} - {"inputs", "target", "report"}


class Stage(Protocol):
    def __call__(self, work: LayerWork) -> LayerWork: ...
