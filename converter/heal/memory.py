"""What a heal run needs, estimated before any weight is loaded, so a run that cannot fit is
refused in one sentence instead of dying in the middle.

Both models are resident (the teacher runs alongside the student: for the sizes this tool
targets the teacher's weights cost less than caching its logits would, see docs). Counted: the
teacher's weights; the student's (frozen ones in the run dtype, except those it shares with the
teacher, heal/shared.py; trained ones in fp32 with their gradient and two AdamW moments);
activations, with gradient checkpointing (every layer's input, one layer's recomputation and
its gradients) or without (every layer's activations: faster by one forward pass, used when
that fits in half of what is free); the loss, computed over chunks of positions so only
loss_chunk() rows of logits exist at a time; a fixed runtime overhead. The copy of the best
trained weights is kept in host RAM.

``ranks``: a run sharded over that many processes (torchrun, heal/distributed.py) holds on each
1/ranks of every decoder layer of both models and of the trained state (weights, gradients,
moments, best copy), and the embeddings, final norm and head whole; a single process has 1.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from converter.conversion.device import peak_rss_bytes
from converter.errors import ConversionError
from converter.heal.distributed import UNSHARDED
from converter.heal.objective import loss_chunk
from converter.sources.spec import SourceSpec
from converter.sources.tensors import source_tensors
from transmla_vllm.checkpoint_format import CONVERTED_ATTENTION, CheckpointLayout, layer_prefix

log = logging.getLogger(__name__)
OVERHEAD = {"cpu": 0.6e9, "cuda": 1.5e9}  # interpreter + torch; CUDA context and allocator slack
FIT = 0.9  # refuse above this share of what is available
NO_CHECKPOINTING_SHARE = 0.5  # skip gradient checkpointing when the run fits in this share


def _count(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes.values())


def _per_rank(shapes: dict[str, tuple[int, ...]], names, ranks: int) -> float:
    """Elements of tensors ``names`` one of ``ranks`` ranks holds: 1/ranks of each decoder
    layer's, all of the embeddings, final norm and head (heal/distributed.py UNSHARDED)."""
    return sum(math.prod(shapes[n]) / (1 if n.startswith(UNSHARDED) else ranks) for n in names)


def trainable_names(layout: CheckpointLayout, train: str) -> list[str]:
    """Checkpoint tensors a run trains: the attention tensors the conversion computed (default;
    a Qwen3 layer's kept q/k projections and norms are the teacher's and stay so, see
    docs/heal.md) or all."""
    if train == "all":
        return list(layout.tensors())
    attn = [n for n in layout.attention_shapes() if n in CONVERTED_ATTENTION]
    return [layer_prefix(i) + n for i in range(layout.num_layers) for n in attn]


def shared_names(layout: CheckpointLayout, train: str) -> list[str]:
    """Student tensors a run expects to hold as the teacher's (heal/shared.py checks each):
    those kept from the source that it does not train."""
    trained = set(trainable_names(layout, train))
    return [n for n in layout.kept_from_source() if n not in trained]


@dataclass(frozen=True)
class MemoryEstimate:
    device: str
    parts: dict[str, float]  # bytes on the device
    host: float  # bytes in host RAM besides what ``parts`` puts there on cpu
    available: float | None  # bytes free on the device (None: unknown)
    host_available: float | None
    checkpointing: bool = True
    shared: float = 0.0  # student bytes held once, by the teacher (not in ``parts``)
    ranks: int = 1

    @property
    def total(self) -> float:
        return sum(self.parts.values()) + (self.host if self.device == "cpu" else 0.0)

    def fits(self, share: float = FIT) -> bool:
        return self.available is None or self.total <= share * self.available

    def describe(self) -> str:
        parts = " + ".join(f"{k} {v / 1e9:.2f}" for k, v in self.parts.items())
        if self.device == "cpu":
            parts += f" + best-state copy {self.host / 1e9:.2f}"
        free = f" of {self.available / 1e9:.1f} GB available" if self.available else ""
        total = f"{self.total / 1e9:.2f} GB{free}"
        text = f"memory estimate on {self.device} (computed, GB): {parts} = {total}"
        text += f"; gradient checkpointing {'on' if self.checkpointing else 'off'}"
        text += (
            f"; {self.shared / 1e9:.2f} GB of the student shared with the teacher"
            if self.shared
            else "; nothing shared between teacher and student"
        )
        if self.ranks > 1:
            text += f"; per rank of {self.ranks}"
        if self.device != "cpu":
            text += f"; host RAM {self.host / 1e9:.2f} GB for the best-state copy"
        return text

    def warn_if_shared_less(self, shared_bytes: float) -> None:
        """Say so when loading shared less than the estimate counted (a student tensor that
        differs from the teacher's): the run needs that much more than it printed."""
        if shared_bytes < self.shared:
            log.warning(
                "the memory estimate counted %.2f GB of the student as the teacher's, but only "
                "%.2f GB is equal to it: this run needs %.2f GB more than estimated",
                self.shared / 1e9,
                shared_bytes / 1e9,
                (self.shared - shared_bytes) / 1e9,
            )

    def as_report(self) -> dict:
        """The estimate for the report, in bytes."""
        return {
            "parts": self.parts,
            "host": self.host,
            "total": self.total,
            "shared": self.shared,
            "checkpointing": self.checkpointing,
            "ranks": self.ranks,
            "available": self.available,  # to each rank: its share of the RAM on a CPU
        }

    def check(self) -> None:
        if not self.fits():
            raise ConversionError(
                f"heal needs an estimated {self.total / 1e9:.1f} GB on {self.device} but only "
                f"{self.available / 1e9:.1f} GB is free: lower --batch-size or --seqlen, train "
                "only the attention (--train attention), or use a device with more memory"
            )
        if self.device != "cpu" and self.host_available is not None:
            if self.host > FIT * self.host_available:
                raise ConversionError(
                    f"heal needs an estimated {self.host / 1e9:.1f} GB of host RAM for the copy "
                    f"of the best weights but only {self.host_available / 1e9:.1f} GB is free; "
                    "train only the attention (--train attention) or use a machine with more RAM"
                )


def estimate(
    spec: SourceSpec,
    layout: CheckpointLayout,
    train: str,
    batch_size: int,
    seqlen: int,
    device: str,
    checkpointing: bool = True,
    free: float | None = None,
    share: bool = True,
    ranks: int = 1,
    per_node: int = 1,
) -> MemoryEstimate:
    """Bytes a run of these sizes needs on each of ``ranks`` devices (fp32 on cpu; bf16
    weights and activations on cuda), with the student's kept tensors held by the teacher when
    ``share``. ``per_node`` ranks share this machine's RAM: each may count on its share of it
    (a GPU is each rank's own)."""
    wide = 4
    act = 4 if device == "cpu" else 2
    teacher = source_tensors(spec)
    n_teacher = _per_rank(teacher, teacher, ranks)
    shapes = layout.tensors()
    n_student = _per_rank(shapes, shapes, ranks)
    n_train = _per_rank(shapes, trainable_names(layout, train), ranks)
    n_shared = _per_rank(shapes, shared_names(layout, train), ranks) if share else 0
    s, tokens = layout.shape, batch_size * seqlen
    heads, hidden, inter = s.num_heads, s.hidden_size, layout.intermediate_size
    # one layer's activations (attention scores and probabilities in fp32)
    per_token = heads * (3 * s.q_head_dim + 2 * s.v_head_dim) + 4 * inter + 4 * hidden
    layer = act * tokens * per_token + 2 * 4 * batch_size * heads * seqlen * seqlen
    if checkpointing:  # every layer's input, one layer recomputed, its gradients
        activations = act * tokens * hidden * (layout.num_layers + 2) + 2 * layer
    else:
        activations = (layout.num_layers + 1) * layer
    parts = {
        "teacher": float(act * n_teacher),
        "student": float(act * (n_student - n_train - n_shared) + wide * n_train),
        "gradients+AdamW": float(3 * wide * n_train),
        "activations": float(activations),
        # a chunk's fp32 logits and their temporaries; on a GPU (bf16 weights) also the fp32
        # copies of both heads the logits are made with (objective.ChunkedKL)
        "loss": float(
            6 * 4 * min(tokens, loss_chunk(layout.vocab_size, device)) * layout.vocab_size
            + (0 if act == 4 else 2 * 4 * layout.vocab_size * hidden)
        ),
        "overhead": OVERHEAD["cpu" if device == "cpu" else "cuda"],
    }
    ram = _available("cpu")
    ram = ram / per_node if ram is not None else None
    available = free if free is not None else (ram if device == "cpu" else _available(device))
    host = float(wide * n_train)
    return MemoryEstimate(
        device,
        parts,
        host,
        available,
        ram,
        checkpointing,
        float(act * n_shared),
        ranks,
    )


def plan_memory(
    spec: SourceSpec,
    layout: CheckpointLayout,
    train: str,
    batch_size: int,
    seqlen: int,
    device: str,
    share: bool = True,
    ranks: int = 1,
    per_node: int = 1,
) -> MemoryEstimate:
    """Without gradient checkpointing when that fits comfortably, else with it. ``batch_size``
    is the global batch: each of ``ranks`` runs its share; ``per_node`` of them share this
    machine's RAM."""
    sizes = (spec, layout, train, max(1, batch_size // ranks), seqlen, device)
    kw = dict(share=share, ranks=ranks, per_node=per_node)
    fast = estimate(*sizes, checkpointing=False, **kw)
    if fast.fits(NO_CHECKPOINTING_SHARE):
        return fast
    return estimate(*sizes, checkpointing=True, **kw)


def measured_peak(device: str) -> tuple[int, str]:
    """(bytes, how measured) of this process's peak on ``device``, to set beside the estimate:
    the peak resident memory on a CPU, the peak allocated by torch on a GPU."""
    if device == "cpu":
        return peak_rss_bytes(), "VmHWM of /proc/self/status (the whole process)"
    return int(torch.cuda.max_memory_allocated()), "torch.cuda.max_memory_allocated"


def _available(device: str) -> float | None:
    if device == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024.0
        except OSError:
            return None
        return None
    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return float(free)


def check_generation_memory(needed: float, device: str) -> None:
    """Refuse, before it starts, a vLLM engine for the teacher text that would not fit in
    FIT of what ``device`` has free (heal/teacher_text.py generation_memory); it is gone before
    the models heal trains are loaded, so the two never need memory at once."""
    free = _available(device)
    log.info(
        "teacher text: vLLM engine needs about %.2f GB on %s%s",
        needed / 1e9,
        device,
        f" of {free / 1e9:.1f} GB available" if free else "",
    )
    if free is not None and needed > FIT * free:
        raise ConversionError(
            f"writing the teacher text needs about {needed / 1e9:.1f} GB on {device} (the "
            f"teacher in vLLM and its KV cache) but only {free / 1e9:.1f} GB is free; lower "
            "--seqlen or free memory"
        )
