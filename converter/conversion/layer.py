"""Convert one decoder layer: run its method's stages, then move the source stream on.

What a layer yields: its MLA tensors (plus the source's norms and MLP, as stored) in writing
order, the streams the next layer is calibrated on, and its report entry. The stages pass a
``LayerWork`` along (work.py): fixed inputs and target in, each stage's products out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from converter.conversion.converted_layer import converted_rope
from converter.conversion.methods import Method
from converter.conversion.settings import ResolvedSettings
from converter.conversion.source_layers import SourceLayers, batched
from converter.conversion.work import LayerInputs, LayerTarget, LayerWork
from converter.sources.spec import SourceSpec
from transmla_vllm.checkpoint_format import CheckpointLayout


@dataclass
class LayerResult:
    tensors: dict[str, torch.Tensor]  # attention fp32, dense as stored; in writing order
    h_src: torch.Tensor
    h_conv: torch.Tensor | None
    report: dict = field(default_factory=dict)


def convert_layer(
    i: int,
    layers: SourceLayers,
    spec: SourceSpec,
    settings: ResolvedSettings,
    method: Method,
    mla_config,
    h_src: torch.Tensor,
    h_conv: torch.Tensor | None,
    batch: int,
    n_train: int | None = None,
) -> LayerResult:
    """Convert layer ``i``. Chunks [0, n_train) give statistics; the rest (held out) are only
    used to choose FreqFold per layer when it is "auto". ``h_src`` is overwritten with the
    next layer's source stream (returned as ``LayerResult.h_src``)."""
    layer = layers.layer(i)
    inputs = LayerInputs(
        index=i,
        layer=layer,
        spec=spec,
        rope=layers.rope,
        h_src=h_src,
        h_conv=h_conv,
        stream=method.inputs,
        n_train=h_src.shape[0] if n_train is None else n_train,
        batch=batch,
        device=layers.device,
    )
    target = LayerTarget(
        rope_dim=settings.rope_dim,
        kv_lora_rank=settings.kv_lora_rank,
        freqfold=settings.freqfold,
        mla_config=mla_config,
        conv_rope=converted_rope(mla_config, h_src.shape[1], layers.device),
    )
    work = LayerWork(inputs, target, report={"layer": i})
    for stage in method.stages:
        work = stage(work)
    attention = work.need("attention").tensors
    # the next layer's source stream overwrites this one in place (nothing reads it after this:
    # at 128 chunks x 256 tokens that is 0.5 GB saved for hidden 4096, 1 GB for 8192)
    next_src = batched(
        h_src,
        batch,
        layers.device,
        lambda h, _sl: layer(h, attention_mask=None, position_embeddings=layers.rope),
        out=h_src,
    )
    # dense tensors as stored (the MLP is still memory-mapped): the writer casts them
    state = layer.state_dict()
    layout = CheckpointLayout.from_config(mla_config)
    tensors = {name: attention[name] for name in layout.attention_shapes()}
    tensors.update({name: state[name].detach().to("cpu") for name in layout.dense_shapes(i)})
    return LayerResult(tensors, next_src, work.next_conv, dict(work.report))
