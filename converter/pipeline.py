"""The conversion, start to end: source -> calibration -> per-layer math -> checkpoint."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from converter import __version__
from converter.calibration import kv_second_moments, read_calibration_text, token_chunks
from converter.checkpoint.source import (
    load_source_model,
    load_tokenizer,
    read_config,
    resolve_source,
)
from converter.checkpoint.writer import (
    ShardedWriter,
    copy_remote_code,
    copy_verbatim,
    parse_size,
    staging_folder,
)
from converter.errors import ConversionError
from converter.math.assemble import GQAAttention, assemble_mla
from converter.math.kv_pca import balanced_kv_basis
from converter.math.rorope import key_rotation
from converter.model_card import write_model_card
from converter.settings import DTYPES, resolve_settings
from converter.sources.base import SourceSpec, inspect_source
from transmla_vllm.format import MLAShape, build_config

log = logging.getLogger(__name__)
REPORT_FILE = "transmla_report.json"


@dataclass
class ConvertOptions:
    src: str
    dst: str
    rope_dim: int | None = None
    kv_lora_rank: int = 512
    freqfold: int | None = None
    calib_text: str | None = None
    calib_samples: int = 128
    calib_seqlen: int = 256
    dtype: str | None = None
    device: str = "auto"
    max_shard_size: str = "5GB"
    overwrite: bool = False
    revision: str | None = None


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConversionError("--device cuda was asked for but torch sees no CUDA device")
    return device


def _layer_attention(state: dict[str, torch.Tensor], spec: SourceSpec, i: int) -> GQAAttention:
    def get(proj: str, kind: str = "weight") -> torch.Tensor | None:
        t = state.get(spec.attn_name(i, proj, kind))
        return None if t is None else t.detach().to("cpu", torch.float64)

    return GQAAttention(get("q_proj"), get("k_proj"), get("v_proj"), get("o_proj"),
                        spec.num_heads, spec.num_kv_heads, spec.head_dim,
                        get("q_proj", "bias"), get("k_proj", "bias"), get("v_proj", "bias"))


def convert(opts: ConvertOptions) -> Path:
    """Convert ``opts.src`` into an MLA checkpoint at ``opts.dst``; return the folder."""
    started = time.time()
    dst = Path(opts.dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not opts.overwrite:
        raise ConversionError(f"--dst {dst} exists and is not empty; pass --overwrite to "
                              "replace it or choose another folder")
    src = resolve_source(opts.src, opts.revision)
    spec = inspect_source(read_config(src))
    settings = resolve_settings(spec, opts.rope_dim, opts.kv_lora_rank, opts.freqfold,
                                opts.dtype)
    if opts.calib_text is None:
        raise ConversionError("no calibration text: pass --calib-text FILE_OR_FOLDER "
                              "(UTF-8 prose or code similar to what the model will serve)")
    device = pick_device(opts.device)
    log.info("source: %s (%s, %d layers, %d heads, %d KV heads, head_dim %d)", src,
             spec.architecture, spec.num_layers, spec.num_heads, spec.num_kv_heads,
             spec.head_dim)
    log.info("settings: rope dim %d, kv_lora_rank %d, freqfold %d, output dtype %s, device %s",
             settings.rope_dim, settings.kv_lora_rank, settings.freqfold, settings.out_dtype,
             device)

    text, calib_files = read_calibration_text(opts.calib_text)
    tokenizer = load_tokenizer(src)
    chunks = token_chunks(tokenizer, text, opts.calib_samples, opts.calib_seqlen)
    log.info("calibration: %d chunks x %d tokens = %d tokens from %d file(s)", chunks.shape[0],
             chunks.shape[1], chunks.numel(), len(calib_files))
    model = load_source_model(src, device)
    grams = kv_second_moments(model, chunks, device=device)
    state = model.state_dict()
    out_dtype = DTYPES[settings.out_dtype]
    width = spec.kv_width
    shape = MLAShape(spec.hidden_size, spec.num_heads, settings.kv_lora_rank,
                     settings.rope_dim, spec.head_dim, spec.head_dim)
    layers_report = []

    with staging_folder(dst, opts.overwrite) as tmp:
        writer = ShardedWriter(tmp, parse_size(opts.max_shard_size))
        writer.add("model.embed_tokens.weight", state["model.embed_tokens.weight"].to(out_dtype))
        for i in tqdm(range(spec.num_layers), desc="converting layers", unit="layer"):
            rotation = key_rotation(grams[i][:width, :width], spec.num_kv_heads, spec.head_dim,
                                    settings.rope_dim, settings.freqfold)
            latent = balanced_kv_basis(grams[i], rotation.nope, settings.kv_lora_rank)
            mla = assemble_mla(_layer_attention(state, spec, i), rotation, latent)
            for name, tensor in mla.items():
                if not torch.isfinite(tensor).all():
                    raise ConversionError(f"layer {i}: {name} came out non-finite; the source "
                                          "weights or calibration statistics are corrupt")
                writer.add(f"model.layers.{i}.{name}", tensor.to(out_dtype))
            for name in ("input_layernorm.weight", "post_attention_layernorm.weight",
                         "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"):
                writer.add(f"model.layers.{i}.{name}", state[f"model.layers.{i}.{name}"]
                           .to(out_dtype))
            layers_report.append({"layer": i,
                                  "rope_key_energy": rotation.rope_energy_fraction,
                                  "latent_energy": latent.latent_energy_fraction,
                                  "key_scale": latent.key_scale})
            log.info("layer %d: rope keeps %.2f%% of key energy; latent keeps %.2f%% of "
                     "balanced [K_nope; V] energy (s = %.3g)", i,
                     100 * rotation.rope_energy_fraction, 100 * latent.latent_energy_fraction,
                     latent.key_scale)
        writer.add("model.norm.weight", state["model.norm.weight"].to(out_dtype))
        if not spec.tie_word_embeddings:
            writer.add("lm_head.weight", state["lm_head.weight"].to(out_dtype))
        shards = writer.close()
        del model, state

        provenance = {
            "converter_version": __version__,
            "method": "transmla",
            "source": opts.src,
            "source_architecture": spec.architecture,
            "source_kv_heads": spec.num_kv_heads,
            "source_head_dim": spec.head_dim,
            "rope_dim": settings.rope_dim,
            "kv_lora_rank": settings.kv_lora_rank,
            "freqfold": settings.freqfold,
            "calibration": {"files": [Path(f).name for f in calib_files][:20],
                            "samples": int(chunks.shape[0]), "seqlen": int(chunks.shape[1]),
                            "tokens": int(chunks.numel())},
        }
        config = build_config(
            shape=shape, vocab_size=spec.vocab_size, intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers, rms_norm_eps=spec.rms_norm_eps,
            max_position_embeddings=spec.max_position_embeddings,
            rope_parameters=spec.rope_parameters, tie_word_embeddings=spec.tie_word_embeddings,
            q_bias=spec.q_bias, kv_a_bias=spec.k_bias or spec.v_bias,
            dtype=settings.out_dtype, token_ids=spec.token_ids, provenance=provenance)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copied = copy_verbatim(src, tmp)
        copy_remote_code(tmp)
        before, after = spec.kv_elements_per_token, shape.kv_elements_per_token
        summary = {"kv_elements_per_token_per_layer": {"source": before, "converted": after},
                   "kv_reduction": 1 - after / before, "layers": layers_report,
                   "shards": shards, "seconds": round(time.time() - started, 1)}
        (tmp / REPORT_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        write_model_card(tmp, spec, config, summary, opts.src, src)
        log.info("copied %s", ", ".join(copied) if copied else "no tokenizer files (none found)")
    log.info("KV cache per token per layer: %d -> %d elements (%.1f%% %s); %d layers -> %s",
             before, after, 100 * abs(1 - after / before),
             "smaller" if after < before else "LARGER", spec.num_layers, dst)
    log.info("done in %.1f s", time.time() - started)
    return dst
