"""heal over several processes: ``torchrun --nproc-per-node N -m converter heal ...``.

torch's own engine, nothing home-made: each rank joins one process group (nccl on GPUs, gloo on
CPUs) and FSDP2 (``fully_shard``) shards every decoder layer of the teacher and of the student
over all ranks, so each holds 1/N of both models' layers, of the trained weights, their
gradients and AdamW's moments. The embeddings, final norm and head stay whole on every rank
(UNSHARDED): the loss multiplies the head outside any layer's forward, where FSDP would not
gather it. With ``--train attention`` they are frozen; with ``--train all`` their gradients are
averaged over ranks before each step (clip_and_average_grads) and every rank makes the same
AdamW update to its whole copy. Data parallel: each rank takes its
share of every global batch (``--batch-size`` counts all ranks) and of the held-out rows; FSDP
averages the gradients, so N ranks train what one process trains, up to reduction order.

Each decoder layer is its own FSDP root (the model itself is not wrapped) and must reshard after
its forward: a root keeps its gathered weights otherwise, the optimizer then holds the gathered
copies instead of the shards, no step reaches the weights, and gloo crashes.

Everything here is a no-op for SINGLE (a plain ``python -m converter heal``): same code path,
no process group.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta

import torch

from converter.errors import ConversionError

log = logging.getLogger(__name__)
# the parts of a model that every rank holds whole (see the module docstring)
UNSHARDED = ("model.embed_tokens", "model.norm", "lm_head")
# torchrun's variables: a process started by it has all of these
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Launch:
    """How a run was started: ``ranks`` processes over ``nodes`` machines, this one ``rank``."""

    ranks: int = 1
    rank: int = 0
    local_rank: int = 0
    nodes: int = 1
    backend: str | None = None  # None: one process, no process group

    @property
    def main(self) -> bool:
        """Whether this rank logs, shows progress and writes."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.backend is not None

    @property
    def per_node(self) -> int:
        """Ranks on each machine: they share its RAM."""
        return max(1, self.ranks // self.nodes)

    def as_report(self) -> dict:
        return {"ranks": self.ranks, "nodes": self.nodes, "backend": self.backend or "none"}

    def describe(self) -> str:
        if not self.sharded:
            return "one process"
        return f"{self.ranks} ranks on {self.nodes} node(s), {self.backend}, FSDP2"


SINGLE = Launch()


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets its env)."""
    return all(k in os.environ for k in TORCHRUN_ENV)


def start(device: str, timeout_s: float) -> tuple[Launch, str]:
    """Join torchrun's process group; returns the launch and this rank's device ("cpu" or
    "cuda:LOCAL_RANK"). A rank that cannot reach the others within ``timeout_s`` gives up in
    one sentence."""
    import torch.distributed as dist

    rank, ranks = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", ranks))
    if device == "cpu":
        backend = "gloo"
    else:
        backend = "nccl"
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    try:
        with _native_stderr_to_debug_log():
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
            dist.barrier()
    except Exception as err:  # noqa: BLE001 - any failure to join is the same sentence
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConversionError(
            f"rank {rank} of {ranks} could not reach the others at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within --dist-timeout "
            f"{timeout_s:g} s ({first[:200]})"
        ) from None
    nodes = max(1, ranks // max(1, local_ranks))
    return Launch(ranks, rank, local_rank, nodes, backend), device


@contextlib.contextmanager
def _native_stderr_to_debug_log():
    """c10d's C++ side prints each failed connection try with a stack trace straight to file
    descriptor 2; while joining, that goes to the debug log instead (a failure to join is said
    in one line by start())."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace").strip()
            if text:
                log.debug("while joining the process group: %s", text)


def quiet_rank(launch: Launch) -> None:
    """Only rank 0 speaks: the others log errors alone (each rank still prints its own one-line
    refusal, commands/errors.py)."""
    if not launch.main:
        logging.getLogger().setLevel(logging.ERROR)
        logging.getLogger("converter").setLevel(logging.ERROR)


def end(launch: Launch) -> None:
    if launch.sharded:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def shard(model, launch: Launch) -> None:
    """Shard each decoder layer of ``model`` over all ranks (FSDP2), in place. The model must be
    on its device already; nothing may move it afterwards."""
    if not launch.sharded:
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (launch.ranks,))
    dtypes = {p.dtype for p in model.model.layers.parameters()}
    # a GPU student keeps its frozen weights in bf16 and its trained ones in fp32; FSDP gathers
    # one dtype per layer, so it gathers both in bf16 (what autocast computes in) and reduces
    # the gradients in fp32
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if len(dtypes) > 1
        else MixedPrecisionPolicy()
    )
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True, mp_policy=policy)


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (``t`` itself when it is not sharded)."""
    return t.to_local() if is_sharded(t) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole on every rank (a collective for a sharded tensor: all ranks call it)."""
    return t.full_tensor() if is_sharded(t) else t


def like(whole: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``whole`` as ``param`` is sharded (``whole`` itself when it is not)."""
    if not is_sharded(param):
        return whole
    from torch.distributed.tensor import distribute_tensor

    whole = whole.to(param.device, param.dtype)
    return distribute_tensor(whole, param.device_mesh, param.placements).to_local()


def _group_op(values: list[float], op: str, launch: Launch) -> list[float]:
    if not launch.sharded:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(launch))
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def sums(values: list[float], launch: Launch) -> list[float]:
    """Each value summed over all ranks."""
    return _group_op(values, "sum", launch)


def gather(value: float, launch: Launch) -> list[float]:
    """``value`` of every rank, in rank order, on every rank."""
    if not launch.sharded:
        return [value]
    import torch.distributed as dist

    out = [torch.zeros((), dtype=torch.float64, device=_comm_device(launch))] * launch.ranks
    out = [torch.zeros_like(o) for o in out]
    dist.all_gather(out, torch.tensor(value, dtype=torch.float64, device=_comm_device(launch)))
    return [float(o) for o in out]


def all_agree(ok: bool, launch: Launch) -> bool:
    """True on every rank when ``ok`` on every rank."""
    return _group_op([0.0 if ok else 1.0], "sum", launch)[0] == 0.0


def barrier(launch: Launch) -> None:
    if launch.sharded:
        import torch.distributed as dist

        dist.barrier()


def _comm_device(launch: Launch) -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if launch.backend == "nccl"
        else (torch.device("cpu"))
    )


def rank_rows(rows: torch.Tensor, launch: Launch) -> torch.Tensor:
    """This rank's contiguous share of ``rows`` (sizes differ by at most one; a global batch
    splits evenly, checks.py refuses a --batch-size the rank count does not divide)."""
    if not launch.sharded:
        return rows
    return torch.tensor_split(rows, launch.ranks)[launch.rank]


def forwards_per_rank(n_rows: int, per_forward: int, launch: Launch) -> int:
    """Forwards every rank runs over its share of ``n_rows`` rows: the same count on all ranks
    (FSDP gathers each layer inside a forward, a collective every rank must join), so a rank
    with fewer rows runs the last ones on a dummy row whose figures it drops."""
    most = -(-n_rows // launch.ranks)
    return -(-most // per_forward)


def clip_and_average_grads(params: list[torch.Tensor], max_norm: float, launch: Launch) -> None:
    """What one process's ``clip_grad_norm_`` does to the global batch's gradients, on every
    rank. FSDP has averaged the sharded ones (decoder layers); the ones every rank holds whole
    (UNSHARDED, trained with ``--train all``) hold this rank's share only, so they are averaged
    here; the norm then counts each sharded entry once and each whole one once."""
    if not launch.sharded:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    whole = [g for g in grads if not is_sharded(g)]
    for g in whole:
        dist.all_reduce(g, op=dist.ReduceOp.SUM)  # gloo has no AVG
        g.div_(launch.ranks)

    def squares(gs: list[torch.Tensor]) -> float:  # one transfer per call, not one per tensor
        norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in gs]
        return float(torch.stack(norms).square().sum()) if norms else 0.0

    shards = squares([local(g) for g in grads if is_sharded(g)])
    total = math.sqrt(sums([shards], launch)[0] + squares(whole))
    coef = max_norm / (total + 1e-6)  # clip_grad_norm_'s formula
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)


def held_bytes(params: dict[str, torch.Tensor]) -> int:
    """Bytes of ``params`` this rank holds (its shards)."""
    return sum(local(p).numel() * local(p).element_size() for p in params.values())
