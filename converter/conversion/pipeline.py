"""The conversion, start to end, streaming one decoder layer at a time:

source safetensors (memory-mapped) -> calibration hidden states carried layer to layer ->
per-layer math (rotation, latent, assembly, optional o_proj refit) -> output shards written
tensor by tensor into a staging folder that is renamed into place when complete.
Peak memory: embeddings + one layer + the calibration hidden states, whatever the depth.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from converter import __version__
from converter.calibration.chunks import token_chunks
from converter.calibration.text import CalibrationInput, load_documents
from converter.checkpoint.resume import ResumeState, digest, resumable_folder, resume_folder
from converter.checkpoint.source import load_tokenizer, read_config, resolve_source
from converter.checkpoint.source_reader import SourceReader
from converter.checkpoint.stream_writer import StreamingShardWriter, TensorSlot
from converter.checkpoint.writer import (
    check_destination,
    copy_remote_code,
    copy_verbatim,
    parse_size,
    staging_folder,
)
from converter.conversion.layer import LayerResult, convert_layer
from converter.conversion.methods import DEFAULT_METHOD, METHODS
from converter.conversion.settings import (
    DTYPES,
    ResolvedSettings,
    check_calibration_sizes,
    resolve_settings,
)
from converter.conversion.source_layers import SourceLayers
from converter.errors import ConversionError
from converter.hub.card import write_model_card
from converter.math.rorope import default_freqfold
from converter.sources.base import SourceSpec, inspect_source
from transmla_vllm.checkpoint_format import (
    DENSE_TENSORS,
    KV_A_BIAS,
    Q_BIAS,
    MLAShape,
    build_config,
)

log = logging.getLogger(__name__)
REPORT_FILE = "transmla_report.json"


@dataclass
class ConvertOptions:
    src: str
    dst: str
    rope_dim: int | None = None
    kv_lora_rank: int | None = None  # None: 512, or what the KV budget leaves
    freqfold: int | str | None = None  # None or "auto": best per layer on held-out chunks
    kv_budget: float | None = None
    kv_elements: int | None = None
    target: str = "vllm"
    calib_text: str | None = None
    calib_jsonl: str | None = None
    calib_field: str = "text"
    calib_dataset: str | None = None
    calib_chat: bool = False
    calib_samples: int = 128
    calib_seqlen: int = 256
    dtype: str | None = None
    device: str = "auto"
    max_shard_size: str = "5GB"
    overwrite: bool = False
    revision: str | None = None
    method: str = DEFAULT_METHOD
    batch_size: int = 8
    resume: bool = False


def pick_device(device: str) -> str:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConversionError("--device cuda was asked for but torch sees no CUDA device")
    if device == "cuda":
        full_fp32_matmuls()
    return device


def full_fp32_matmuls() -> None:
    """Calibration needs true fp32 products on the GPU. TF32 (a 10-bit mantissa), which some
    CUDA images switch on for every process (TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1), would round
    the source model's rope angles (an outer product of positions and frequencies) by up to
    ~0.1 rad at position 255 and every projection by ~1e-3."""
    if torch.get_float32_matmul_precision() != "highest":  # cudnn's flag is on by default
        log.info("calibration on cuda: TF32 matmuls turned off (precision was %r)",
                 torch.get_float32_matmul_precision())
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False


def tensor_plan(spec: SourceSpec, shape: MLAShape, out: torch.dtype) -> list[TensorSlot]:
    """Every output tensor with its shape, in writing order (known before any math runs)."""
    D, H = spec.hidden_size, spec.num_heads
    q_rows = H * shape.q_head_dim
    kv_a_rows = shape.kv_elements_per_token
    attn = [("self_attn.q_proj.weight", (q_rows, D))]
    if spec.q_bias:
        attn.append((Q_BIAS, (q_rows,)))
    attn.append(("self_attn.kv_a_proj_with_mqa.weight", (kv_a_rows, D)))
    if spec.k_bias or spec.v_bias:
        attn.append((KV_A_BIAS, (kv_a_rows,)))
    attn += [("self_attn.kv_b_proj.weight",
              (H * (shape.qk_nope_head_dim + shape.v_head_dim), shape.kv_lora_rank)),
             ("self_attn.o_proj.weight", (D, H * shape.v_head_dim))]
    dense = dict(zip(DENSE_TENSORS, [(D,), (D,), (spec.intermediate_size, D),
                                     (spec.intermediate_size, D),
                                     (D, spec.intermediate_size)], strict=True))
    plan = [TensorSlot("model.embed_tokens.weight", (spec.vocab_size, D), out)]
    for i in range(spec.num_layers):
        plan += [TensorSlot(f"model.layers.{i}.{n}", s, out) for n, s in attn]
        plan += [TensorSlot(f"model.layers.{i}.{n}", s, out) for n, s in dense.items()]
    plan.append(TensorSlot("model.norm.weight", (D,), out))
    if not spec.tie_word_embeddings:
        plan.append(TensorSlot("lm_head.weight", (spec.vocab_size, D), out))
    return plan


def _mla_shape(spec: SourceSpec, settings: ResolvedSettings) -> MLAShape:
    return MLAShape(kv_lora_rank=settings.kv_lora_rank, qk_rope_head_dim=settings.rope_dim,
                    qk_nope_head_dim=spec.head_dim, v_head_dim=spec.head_dim,
                    hidden_size=spec.hidden_size, num_heads=spec.num_heads)


def _mla_config(spec: SourceSpec, settings: ResolvedSettings, shape: MLAShape,
                provenance: dict) -> dict:
    return build_config(
        shape=shape, vocab_size=spec.vocab_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, rms_norm_eps=spec.rms_norm_eps,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters=spec.rope_parameters, tie_word_embeddings=spec.tie_word_embeddings,
        q_bias=spec.q_bias, kv_a_bias=spec.k_bias or spec.v_bias, dtype=settings.out_dtype,
        token_ids=spec.token_ids, provenance=provenance)


def release_memory(reader: SourceReader) -> None:
    """Give this layer's memory back before the next one: unmap the source shards, collect,
    and ask glibc to return freed heap to the OS (else RSS creeps up with depth)."""
    import ctypes
    import gc

    reader.release()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _fingerprint(src: Path, reader: SourceReader, config: dict, chunks: torch.Tensor,
                 n_train: int, opts: ConvertOptions, plan: list[TensorSlot]) -> dict:
    """What must not change between an interrupted --resume run and the one continuing it."""
    return {
        "converter version": __version__,
        "source": str(src.resolve()),
        "source files": digest(json.dumps({f: (src / f).stat().st_size
                                           for f in sorted(set(reader.files.values()))})),
        "converted config": digest(json.dumps(config, sort_keys=True)),
        "calibration tokens": digest(chunks.numpy().tobytes()) + f"/{n_train}",
        "output layout": digest(json.dumps([(s.name, s.shape, str(s.dtype)) for s in plan])
                                + opts.max_shard_size),
        "batch size": opts.batch_size,
    }


def _write_layer(writer: StreamingShardWriter, i: int, tensors: dict[str, torch.Tensor],
                 dtype: torch.dtype) -> None:
    """Its own function so no loop variable outlives the layer: one left bound to a tensor that
    views the memory-mapped shard keeps the whole layer resident through the next one."""
    for name, tensor in tensors.items():
        writer.write(f"model.layers.{i}.{name}", tensor.to(dtype))


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def convert(opts: ConvertOptions) -> Path:
    """Convert ``opts.src`` into an MLA checkpoint at ``opts.dst``; return the folder."""
    started = time.time()
    dst = Path(opts.dst)
    check_destination(dst, opts.overwrite, opts.src)  # before any heavy work
    if not opts.resume and resume_folder(dst).is_dir():
        log.warning("%s holds the progress of an interrupted --resume run; this run does not "
                    "use it (add --resume to continue it, or delete it)", resume_folder(dst))
    check_calibration_sizes(opts.calib_samples, opts.calib_seqlen)
    if opts.method not in METHODS:
        raise ConversionError(f"--method {opts.method} is not one of {sorted(METHODS)}")
    method = METHODS[opts.method]
    src = resolve_source(opts.src, opts.revision)
    spec = inspect_source(read_config(src))
    freqfold = opts.freqfold
    if method.name == "transmla" and freqfold is None:
        freqfold = "smallest"  # the published method picks FreqFold by hand, never on data
    settings = resolve_settings(spec, opts.rope_dim, opts.kv_lora_rank, freqfold,
                                opts.dtype, opts.kv_budget, opts.kv_elements, opts.target)
    calib = CalibrationInput(opts.calib_text, opts.calib_jsonl, opts.calib_field,
                             opts.calib_dataset, opts.calib_chat)
    reader = SourceReader(src)
    device = pick_device(opts.device)
    log.info("source: %s (%s, %d layers, %d heads, %d KV heads, head_dim %d, %.2f GB)", src,
             spec.architecture, spec.num_layers, spec.num_heads, spec.num_kv_heads,
             spec.head_dim, reader.total_bytes() / 1e9)
    log.info("settings: method %s, rope dim %d, kv_lora_rank %d, freqfold %s, output dtype %s, "
             "device %s", method.name, settings.rope_dim, settings.kv_lora_rank,
             settings.freqfold_label, settings.out_dtype, device)

    tokenizer = load_tokenizer(src)
    documents, calib_files = load_documents(calib, tokenizer)
    chunks = token_chunks(tokenizer, documents, opts.calib_samples, opts.calib_seqlen)
    n_train = chunks.shape[0]
    if settings.freqfold is None:  # hold out 1/8 of the chunks to choose FreqFold on
        if chunks.shape[0] < 2:
            fold = default_freqfold(spec.head_dim, settings.rope_dim)
            log.warning("one calibration chunk: nothing to hold out for --freqfold auto; using "
                        "freqfold %d (the smallest valid)", fold)
            settings = replace(settings, freqfold=fold)
        else:
            n_train = chunks.shape[0] - max(1, chunks.shape[0] // 8)
    log.info("calibration: %s%s: %d chunks x %d tokens = %d tokens%s", calib.describe(),
             " rendered as chat" if calib.chat else "", chunks.shape[0], chunks.shape[1],
             chunks.numel(), f" ({chunks.shape[0] - n_train} held out for --freqfold auto)"
             if n_train < chunks.shape[0] else "")

    provenance = {
        "converter_version": __version__, "method": method.name, "source": opts.src,
        "source_architecture": spec.architecture, "source_kv_heads": spec.num_kv_heads,
        "source_head_dim": spec.head_dim, "rope_dim": settings.rope_dim,
        "kv_lora_rank": settings.kv_lora_rank, "freqfold": settings.freqfold_label,
        "calibration": {"source": calib.describe(), "chat": calib.chat,
                        "files": [Path(f).name for f in calib_files][:20],
                        "samples": int(chunks.shape[0]), "seqlen": int(chunks.shape[1]),
                        "tokens": int(chunks.numel()), "held_out_chunks":
                            int(chunks.shape[0] - n_train)},
    }
    shape = _mla_shape(spec, settings)
    config = _mla_config(spec, settings, shape, provenance)
    # the converted layers run during calibration read the same config, built once
    from transformers import DeepseekV3Config

    mla_config = DeepseekV3Config(**{k: v for k, v in config.items() if k != "auto_map"})
    out_dtype = DTYPES[settings.out_dtype]
    plan = tensor_plan(spec, shape, out_dtype)
    layers = SourceLayers(src, spec, reader, device, chunks.shape[1])
    report: list[dict] = []

    folder = (resumable_folder(dst, opts.overwrite) if opts.resume
              else staging_folder(dst, opts.overwrite))
    with folder as tmp, torch.no_grad():
        writer = StreamingShardWriter(tmp, plan, parse_size(opts.max_shard_size))
        state = ResumeState(tmp, _fingerprint(src, reader, config, chunks, n_train, opts, plan)
                            ) if opts.resume else None
        progress = state.load() if state is not None else None
        if progress is not None:
            writer.resume_at(progress.tensors_written)
            h_src, h_conv, report = progress.h_src, progress.h_conv, progress.report
            first, earlier = progress.layers_done, progress.seconds
            log.info("resuming from %s: %d of %d layers were done (in %.0f s)", tmp, first,
                     spec.num_layers, earlier)
        else:
            writer.write("model.embed_tokens.weight",
                         reader.get("model.embed_tokens.weight", dtype=out_dtype))
            release_memory(reader)
            h_src = layers.embed(chunks)
            # a copy: convert_layer updates h_src in place
            h_conv = h_src.clone() if method.inputs == "converted" else None
            first, earlier = 0, 0.0
        bar = tqdm(range(first, spec.num_layers), desc="converting layers", unit="layer",
                   initial=first, total=spec.num_layers)
        for i in bar:
            result: LayerResult = convert_layer(i, layers, spec, settings, method, mla_config,
                                                h_src, h_conv, opts.batch_size, n_train)
            _write_layer(writer, i, result.tensors, out_dtype)
            h_src, h_conv = result.h_src, result.h_conv
            report.append(result.report)
            log.info("layer %d: freqfold %d; rope keeps %.2f%% of key energy; latent keeps "
                     "%.2f%% of balanced [K_nope; V] energy (s = %.3g)%s", i,
                     result.report["freqfold"], 100 * result.report["rope_key_energy"],
                     100 * result.report["latent_energy"], result.report["key_scale"],
                     result.report.get("refit_note", ""))
            del result
            release_memory(reader)
            if state is not None:
                writer.flush()
                state.save(i + 1, writer.next, report, h_src, h_conv,
                           earlier + time.time() - started)
        del h_src, h_conv
        writer.write("model.norm.weight", reader.get("model.norm.weight", dtype=out_dtype))
        if not spec.tie_word_embeddings:
            writer.write("lm_head.weight", reader.get("lm_head.weight", dtype=out_dtype))
        shards = writer.close()

        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copied = copy_verbatim(src, tmp)
        copy_remote_code(tmp)
        before = spec.kv_elements_per_token
        after = shape.kv_elements_per_token
        seconds = earlier + time.time() - started  # earlier runs of a --resume included
        summary = {"kv_elements_per_token_per_layer": {"source": before, "converted": after},
                   "kv_reduction": 1 - after / before, "layers": report, "shards": shards,
                   "method": method.name, "seconds": round(seconds, 1),
                   "peak_rss_bytes": peak_rss_bytes()}
        (tmp / REPORT_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        write_model_card(tmp, spec, config, summary, opts.src, src)
        log.info("copied %s", ", ".join(copied) if copied else "no tokenizer files (none found)")
    seconds = earlier + time.time() - started
    log.info("KV cache per token per layer: %d -> %d elements (%.1f%% %s); %d layers -> %s",
             before, after, 100 * abs(1 - after / before),
             "smaller" if after < before else "LARGER", spec.num_layers, dst)
    log.info("done in %.1f s%s, peak RSS %.2f GB, %.3f GB/s of source weights", seconds,
             " (with the interrupted runs)" if earlier else "",
             peak_rss_bytes() / 1e9, reader.total_bytes() / 1e9 / max(seconds, 1e-9))
    return dst


__all__ = ["ConvertOptions", "convert", "pick_device", "tensor_plan"]
