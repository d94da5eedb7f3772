"""The conversion, start to end, in three steps: prepare a plan, convert the layers one at a
time, finalize the folder.

source safetensors (memory-mapped) -> calibration hidden states carried layer to layer ->
per-layer stages (statistics, rotation, latent, assembly, o_proj refit) -> output shards
written tensor by tensor into a staging folder that is renamed into place when complete.
Peak memory: embeddings + one layer + the calibration hidden states, whatever the depth.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from converter import __version__
from converter.checkpoint.resume import ResumeState, digest, resumable_folder
from converter.checkpoint.stream_writer import StreamingShardWriter
from converter.checkpoint.writer import copy_remote_code, copy_verbatim, staging_folder
from converter.conversion.device import peak_rss_bytes, release_memory
from converter.conversion.layer import LayerResult, convert_layer
from converter.conversion.options import ConvertOptions
from converter.conversion.plan import ConversionPlan, prepare
from converter.conversion.source_layers import SourceLayers
from converter.hub.card import write_model_card
from transmla_vllm.checkpoint_format import (
    CONFIG_FILE,
    EMBED,
    FINAL_NORM,
    LM_HEAD,
    REPORT_FILE,
    layer_prefix,
)

log = logging.getLogger(__name__)


@dataclass
class LayersDone:
    """What running the layers leaves for finalize."""

    report: list[dict]
    shards: dict
    seconds_before: float  # spent in earlier, interrupted runs of a --resume


def convert(opts: ConvertOptions) -> Path:
    """Convert ``opts.src`` into an MLA checkpoint at ``opts.dst``; return the folder."""
    started = time.time()
    plan = prepare(opts)
    folder = resumable_folder if opts.resume else staging_folder
    with folder(plan.dst, opts.overwrite) as tmp, torch.no_grad():
        done = run_layers(plan, tmp, started)
        finalize(plan, tmp, done, started)
    _log_done(plan, done, started)
    return plan.dst


def run_layers(plan: ConversionPlan, tmp: Path, started: float) -> LayersDone:
    """Write the embeddings, every converted layer and the head into ``tmp``'s shards; with
    --resume, record progress after each layer and continue from the last recorded one."""
    spec, reader, out_dtype = plan.spec, plan.reader, plan.out_dtype
    chunks, n_train = plan.calibration.chunks, plan.calibration.n_train
    writer = StreamingShardWriter(tmp, plan.slots, plan.max_shard_bytes)
    layers = SourceLayers(plan.src, spec, reader, plan.device, chunks.shape[1])
    # the converted layers run during calibration read the same config, built once
    from transformers import DeepseekV3Config

    mla_config = DeepseekV3Config(**{k: v for k, v in plan.config.items() if k != "auto_map"})
    state = ResumeState(tmp, _fingerprint(plan)) if plan.opts.resume else None
    progress = state.load() if state is not None else None
    if progress is not None:
        writer.resume_at(progress.tensors_written)
        h_src, h_conv, report = progress.h_src, progress.h_conv, progress.report
        first, earlier = progress.layers_done, progress.seconds
        log.info(
            "resuming from %s: %d of %d layers were done (in %.0f s)",
            tmp,
            first,
            spec.num_layers,
            earlier,
        )
    else:
        writer.write(EMBED, reader.get(EMBED, dtype=out_dtype))
        release_memory(reader)
        h_src = layers.embed(chunks)
        # a copy: convert_layer updates h_src in place
        h_conv = h_src.clone() if plan.method.carries_converted_stream else None
        first, earlier, report = 0, 0.0, []
    bar = tqdm(
        range(first, spec.num_layers),
        desc="converting layers",
        unit="layer",
        initial=first,
        total=spec.num_layers,
    )
    for i in bar:
        result: LayerResult = convert_layer(
            i,
            layers,
            spec,
            plan.settings,
            plan.method,
            mla_config,
            h_src,
            h_conv,
            plan.opts.batch_size,
            n_train,
        )
        _write_layer(writer, i, result.tensors, out_dtype)
        h_src, h_conv = result.h_src, result.h_conv
        report.append(result.report)
        _log_layer(result.report)
        del result
        release_memory(reader)
        if state is not None:
            writer.flush()
            seconds = earlier + time.time() - started
            state.save(i + 1, writer.next, report, h_src, h_conv, seconds)
    del h_src, h_conv
    writer.write(FINAL_NORM, reader.get(FINAL_NORM, dtype=out_dtype))
    if not spec.tie_word_embeddings:
        writer.write(LM_HEAD, reader.get(LM_HEAD, dtype=out_dtype))
    return LayersDone(report, writer.close(), earlier)


def finalize(plan: ConversionPlan, tmp: Path, done: LayersDone, started: float) -> None:
    """config.json, tokenizer and chat template, remote code, report and model card."""
    (tmp / CONFIG_FILE).write_text(json.dumps(plan.config, indent=2) + "\n")
    copied = copy_verbatim(plan.src, tmp)
    copy_remote_code(tmp)
    before, after = plan.spec.kv_elements_per_token, plan.shape.kv_elements_per_token
    summary = {
        "kv_elements_per_token_per_layer": {"source": before, "converted": after},
        "kv_reduction": 1 - after / before,
        "layers": done.report,
        "shards": done.shards,
        "method": plan.method.name,
        "seconds": round(done.seconds_before + time.time() - started, 1),
        "peak_rss_bytes": peak_rss_bytes(),
    }
    (tmp / REPORT_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    write_model_card(tmp, plan.spec, plan.config, summary, plan.opts.src, plan.src)
    log.info("copied %s", ", ".join(copied) if copied else "no tokenizer files (none found)")


def _write_layer(
    writer: StreamingShardWriter, i: int, tensors: dict[str, torch.Tensor], dtype: torch.dtype
) -> None:
    """Its own function so no loop variable outlives the layer: one left bound to a tensor that
    views the memory-mapped shard keeps the whole layer resident through the next one."""
    for name, tensor in tensors.items():
        writer.write(layer_prefix(i) + name, tensor.to(dtype))


def _fingerprint(plan: ConversionPlan) -> dict:
    """What must not change between an interrupted --resume run and the one continuing it."""
    src, cal = plan.src, plan.calibration
    files = sorted(set(plan.reader.files.values()))
    layout = [(s.name, s.shape, str(s.dtype)) for s in plan.slots]
    return {
        "converter version": __version__,
        "source": str(src.resolve()),
        "source files": digest(json.dumps({f: (src / f).stat().st_size for f in files})),
        "converted config": digest(json.dumps(plan.config, sort_keys=True)),
        "calibration tokens": digest(cal.chunks.numpy().tobytes()) + f"/{cal.n_train}",
        "output layout": digest(json.dumps(layout) + plan.opts.max_shard_size),
        "batch size": plan.opts.batch_size,
    }


def _log_layer(report: dict) -> None:
    refit = report.get("o_refit_rel_error")
    log.info(
        "layer %d: freqfold %d; rope keeps %.2f%% of key energy; latent keeps %.2f%% of "
        "balanced [K_nope; V] energy (s = %.3g)%s",
        report["layer"],
        report["freqfold"],
        100 * report["rope_key_energy"],
        100 * report["latent_energy"],
        report["key_scale"],
        f"; o_proj refit: relative error {refit[0]:.4f} -> {refit[1]:.4f}" if refit else "",
    )


def _log_done(plan: ConversionPlan, done: LayersDone, started: float) -> None:
    before, after = plan.spec.kv_elements_per_token, plan.shape.kv_elements_per_token
    seconds = done.seconds_before + time.time() - started
    log.info(
        "KV cache per token per layer: %d -> %d elements (%.1f%% %s); %d layers -> %s",
        before,
        after,
        100 * abs(1 - after / before),
        "smaller" if after < before else "LARGER",
        plan.spec.num_layers,
        plan.dst,
    )
    log.info(
        "done in %.1f s%s, peak RSS %.2f GB, %.3f GB/s of source weights",
        seconds,
        " (with the interrupted runs)" if done.seconds_before else "",
        peak_rss_bytes() / 1e9,
        plan.reader.total_bytes() / 1e9 / max(seconds, 1e-9),
    )


__all__ = ["ConvertOptions", "convert", "finalize", "prepare", "run_layers"]
