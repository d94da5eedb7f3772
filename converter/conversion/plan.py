"""Step 1 of a conversion: resolve everything the user asked for, once, into one plan.

Source folder and family, settings, device, calibration chunks, the MLA shape, the converted
config and the output tensor list are all decided here, before any layer is converted, so that
bad input is refused early and the later steps only read the plan.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from converter import __version__
from converter.calibration.chunks import RowStart, held_out_count, row_start, token_chunks
from converter.calibration.text import CalibrationInput, load_documents
from converter.checkpoint.fingerprint import source_fingerprint
from converter.checkpoint.resume import resume_folder
from converter.checkpoint.source import load_tokenizer, read_config, resolve_source
from converter.checkpoint.source_reader import SourceReader
from converter.checkpoint.stream_writer import TensorSlot
from converter.checkpoint.writer import check_destination, parse_size
from converter.conversion.device import pick_device
from converter.conversion.methods import METHODS, Method
from converter.conversion.options import ConvertOptions
from converter.conversion.settings import (
    DTYPES,
    ResolvedSettings,
    check_calibration_context,
    check_calibration_sizes,
    resolve_settings,
)
from converter.errors import ConversionError
from converter.hub.ids import check_base_model
from converter.math.rorope import default_freqfold
from converter.sources.inspection import inspect_source
from converter.sources.spec import SourceSpec
from transmla_vllm.checkpoint_format import CheckpointLayout, MLAShape, QKNorm, build_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibration:
    """Token chunks; [0, n_train) give statistics, the rest are held out to choose FreqFold."""

    input: CalibrationInput
    files: list[str]
    chunks: torch.Tensor
    n_train: int
    row_start: RowStart

    @property
    def held_out(self) -> int:
        return int(self.chunks.shape[0] - self.n_train)


@dataclass(frozen=True)
class ConversionPlan:
    opts: ConvertOptions
    dst: Path
    src: Path  # the resolved local folder
    spec: SourceSpec
    reader: SourceReader
    method: Method
    settings: ResolvedSettings
    device: str
    calibration: Calibration
    shape: MLAShape
    config: dict[str, Any]  # config.json of the converted model
    layout: CheckpointLayout

    @property
    def out_dtype(self) -> torch.dtype:
        return DTYPES[self.settings.out_dtype]

    @property
    def slots(self) -> list[TensorSlot]:
        """Every output tensor with its shape and dtype, in writing order."""
        return [TensorSlot(n, s, self.out_dtype) for n, s in self.layout.tensors().items()]

    @property
    def max_shard_bytes(self) -> int:
        return parse_size(self.opts.max_shard_size)


def prepare(opts: ConvertOptions) -> ConversionPlan:
    """Check and resolve ``opts``; cheap checks first, the source's tensors read last."""
    dst = Path(opts.dst)
    check_destination(dst, opts.overwrite, opts.src)
    if not opts.resume and resume_folder(dst).is_dir():
        log.warning(
            "%s holds the progress of an interrupted --resume run; this run does not use it "
            "(add --resume to continue it, or delete it)",
            resume_folder(dst),
        )
    check_calibration_sizes(opts.calib_samples, opts.calib_seqlen)
    if opts.base_model is not None:
        check_base_model(opts.base_model)
    if opts.method not in METHODS:
        raise ConversionError(f"--method {opts.method} is not one of {sorted(METHODS)}")
    method = METHODS[opts.method]
    src = resolve_source(opts.src, opts.revision)
    spec = inspect_source(read_config(src))
    check_calibration_context(opts.calib_seqlen, spec)
    freqfold = opts.freqfold
    if method.name == "transmla" and freqfold is None:
        freqfold = "smallest"  # the published method picks FreqFold by hand, never on data
    settings = resolve_settings(
        spec,
        opts.rope_dim,
        opts.kv_lora_rank,
        freqfold,
        opts.dtype,
        opts.kv_budget,
        opts.kv_elements,
        opts.target,
    )
    reader = SourceReader(src)
    device = pick_device(opts.device)
    log.info(
        "source: %s (%s, %d layers, %d heads, %d KV heads, head_dim %d, %.2f GB)",
        src,
        spec.architecture,
        spec.num_layers,
        spec.num_heads,
        spec.num_kv_heads,
        spec.head_dim,
        reader.total_bytes() / 1e9,
    )
    log.info(
        "settings: method %s, rope dim %d, kv_lora_rank %d, freqfold %s, output dtype %s, "
        "device %s",
        method.name,
        settings.rope_dim,
        settings.kv_lora_rank,
        settings.freqfold_label,
        settings.out_dtype,
        device,
    )
    calibration, settings = _calibration(opts, src, spec, settings)
    shape = MLAShape(
        kv_lora_rank=settings.kv_lora_rank,
        qk_rope_head_dim=settings.rope_dim,
        qk_nope_head_dim=spec.head_dim,
        v_head_dim=spec.head_dim,
        hidden_size=spec.hidden_size,
        num_heads=spec.num_heads,
    )
    layout = CheckpointLayout(
        shape=shape,
        vocab_size=spec.vocab_size,
        intermediate_size=spec.intermediate_size,
        num_layers=spec.num_layers,
        tie_word_embeddings=spec.tie_word_embeddings,
        q_bias=bool(spec.q_bias),
        kv_a_bias=bool(spec.k_bias or spec.v_bias),
        qk_norm=QKNorm(spec.num_kv_heads, spec.head_dim, spec.rms_norm_eps)
        if spec.qk_norm
        else None,
        moe=spec.moe,
    )
    config = build_config(
        layout=layout,
        rms_norm_eps=spec.rms_norm_eps,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters=spec.rope_parameters,
        dtype=settings.out_dtype,
        token_ids=spec.token_ids,
        provenance={
            **_provenance(opts, spec, method, settings, calibration),
            "source_fingerprint": source_fingerprint(spec, reader),
        },
    )
    return ConversionPlan(
        opts, dst, src, spec, reader, method, settings, device, calibration, shape, config, layout
    )


def _calibration(
    opts: ConvertOptions, src: Path, spec: SourceSpec, settings: ResolvedSettings
) -> tuple[Calibration, ResolvedSettings]:
    """Token chunks of the calibration text; HELD_OUT_SHARE of them held out when FreqFold is
    chosen on data."""
    source = opts.text_input
    tokenizer = load_tokenizer(src)
    documents, files = load_documents(source, tokenizer)
    chunks = token_chunks(tokenizer, documents, opts.calib_samples, opts.calib_seqlen)
    n_train = chunks.shape[0]
    if settings.freqfold is None:  # hold some chunks out to choose FreqFold on
        if chunks.shape[0] < 2:
            fold = default_freqfold(spec.head_dim, settings.rope_dim)
            log.warning(
                "one calibration chunk: nothing to hold out for --freqfold auto; using "
                "freqfold %d (the smallest valid)",
                fold,
            )
            settings = replace(settings, freqfold=fold)
        else:
            n_train = chunks.shape[0] - held_out_count(chunks.shape[0])
    calibration = Calibration(source, files, chunks, n_train, row_start(tokenizer))
    log.info(
        "calibration: %s%s: %d chunks x %d tokens = %d tokens%s",
        source.describe(),
        " rendered as chat" if source.chat else "",
        chunks.shape[0],
        chunks.shape[1],
        chunks.numel(),
        f" ({calibration.held_out} held out for --freqfold auto)" if calibration.held_out else "",
    )
    return calibration, settings


def _provenance(
    opts: ConvertOptions,
    spec: SourceSpec,
    method: Method,
    settings: ResolvedSettings,
    calibration: Calibration,
) -> dict[str, Any]:
    """The config's ``transmla`` block: how this checkpoint was made."""
    chunks = calibration.chunks
    provenance = {
        "converter_version": __version__,
        "method": method.name,
        "source": opts.src,
        "source_architecture": spec.architecture,
        "source_kv_heads": spec.num_kv_heads,
        "source_head_dim": spec.head_dim,
        "rope_dim": settings.rope_dim,
        "kv_lora_rank": settings.kv_lora_rank,
        "freqfold": settings.freqfold_label,
        "calibration": {
            "source": calibration.input.describe(),
            "chat": calibration.input.chat,
            "files": [Path(f).name for f in calibration.files][:20],
            "samples": int(chunks.shape[0]),
            "seqlen": int(chunks.shape[1]),
            "tokens": int(chunks.numel()),
            "held_out_chunks": calibration.held_out,
            "row_start": calibration.row_start.as_report(),
        },
    }
    if opts.base_model:
        provenance["base_model"] = opts.base_model
    return provenance
