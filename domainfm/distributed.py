"""Everything about processes and ranks: gathering a batch across processes so that contrastive
losses see the global batch, launcher detection, which process is rank 0 (:func:`is_global_zero`)
and how rank 0 hands its MLflow run to the workers Lightning starts (:func:`handoff_to_workers`).

Contrastive losses use the other samples of the batch as negatives (and, for the soft loss, as
soft positives), so under data parallelism every rank must see every rank's embeddings. A plain
``all_gather`` cuts the graph; :func:`all_gather_with_grad` keeps it.

Why the backward sums over ranks: every rank computes the *same* global loss ``L`` from the
gathered batch, and each rank's local rows reach ``L`` on every rank. DDP then *averages* the
parameter gradients over the ``W`` ranks. Summing the incoming gradient over ranks before taking
the local slice gives rank ``r`` the gradient ``W * dL/dz_r``; DDP's average of
``sum_r W * (local part of dL/dθ) / W`` is exactly the single-process ``dL/dθ``. Taking only the
local slice (no sum) would leave the parameters with ``dL/dθ / W``.

Ranks may hold different numbers of rows (the last, smaller batch of an epoch): sizes are
exchanged first and the rows padded to the largest, then trimmed.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:  # torch is imported inside the functions: the CLI imports nothing heavy
    import torch


def is_distributed() -> bool:
    """True when a torch.distributed process group of more than one process is active."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_sizes(n: int, device) -> list[int]:
    import torch
    import torch.distributed as dist

    size = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _all_gather_rows(x: "torch.Tensor", sizes: list[int]) -> "torch.Tensor":
    """Concatenate every rank's rows of ``x`` (rank order), padding to equal sizes for the collective."""
    import torch
    import torch.distributed as dist

    largest = max(sizes)
    padded = x
    if x.shape[0] < largest:
        padded = torch.cat([x, x.new_zeros((largest - x.shape[0], *x.shape[1:]))])
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(pieces, sizes)])


def _gather_function():
    # The autograd.Function is built on first use so that importing this module needs no torch.
    global _GatherWithGrad
    if _GatherWithGrad is not None:
        return _GatherWithGrad
    import torch
    import torch.distributed as dist

    class GatherWithGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            sizes = _gather_sizes(x.shape[0], x.device)
            rank = dist.get_rank()
            ctx.start = sum(sizes[:rank])
            ctx.stop = ctx.start + sizes[rank]
            return _all_gather_rows(x, sizes)

        @staticmethod
        def backward(ctx, grad):
            # Sum over ranks (see the module docstring), then keep this rank's rows.
            grad = grad.contiguous().clone()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            return grad[ctx.start : ctx.stop]

    _GatherWithGrad = GatherWithGrad
    return GatherWithGrad


_GatherWithGrad = None


def all_gather_with_grad(x: "torch.Tensor") -> "torch.Tensor":
    """All ranks' rows of ``x`` concatenated in rank order, differentiable.

    The identity when no process group (of more than one process) is active. Tensors that do
    not require grad are gathered the same way (labels, say); backward is then never called.
    Every rank must call it, in the same order, and later run backward if any rank does.
    """
    if not is_distributed():
        return x
    return _gather_function().apply(x)


# ---------------------------------------------------------------- launching across machines

#: What Lightning's plain environment reads on every node of a job started without a scheduler
#: (``lightning.fabric.plugins.environments.LightningEnvironment``); the world size is
#: ``--num-nodes x --devices``.
PLAIN_LAUNCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK")


def launcher_environment() -> str | None:
    """The cluster environment Lightning will find for a multi-node job, or None.

    One of ``"slurm"`` (``srun`` inside an allocation: SLURM_NTASKS, SLURM_PROCID, ...),
    ``"torchelastic"`` (``torchrun``), ``"lsf"`` (``jsrun``), ``"mpi"`` (``mpirun`` with mpi4py), or
    ``"env"`` (MASTER_ADDR, MASTER_PORT and NODE_RANK set by hand on each node). Uses Lightning's
    own detectors, so the answer is the environment Lightning's launcher will then use.
    """
    import os

    from lightning.fabric.plugins.environments import (LSFEnvironment, MPIEnvironment, SLURMEnvironment,
                                                       TorchElasticEnvironment)

    for name, env in (("slurm", SLURMEnvironment), ("torchelastic", TorchElasticEnvironment),
                      ("lsf", LSFEnvironment), ("mpi", MPIEnvironment)):
        try:
            if env.detect():
                return name
        except Exception:  # a detector that cannot run here (MPI without mpi4py) detects nothing
            continue
    if all(os.environ.get(v) for v in PLAIN_LAUNCH_VARS):
        return "env"
    return None


def check_launch(*, num_nodes: int = 1, strategy: str = "auto", accelerator: str = "auto") -> None:
    """Refuse, before anything runs, a job that could only fail or hang once launched.

    - ``num_nodes > 1`` with no launcher environment (see :func:`launcher_environment`): every node
      would take itself for node 0 and wait for peers on 127.0.0.1 forever.
    - ``strategy == "fsdp"`` without a GPU: Lightning (and torch's FSDP) run only on CUDA.

    Raises :class:`~domainfm.errors.DomainFMError` naming what is missing and how to launch.
    """
    from domainfm.errors import DomainFMError

    if num_nodes < 1:
        raise DomainFMError(f"--num-nodes must be at least 1, got {num_nodes}")
    if num_nodes > 1 and launcher_environment() is None:
        import os

        missing = [v for v in PLAIN_LAUNCH_VARS if not os.environ.get(v)]
        raise DomainFMError(
            f"--num-nodes {num_nodes} needs a launcher's environment, and none is set "
            f"(no SLURM_NTASKS/SLURM_PROCID from srun, no torchrun variables, missing {', '.join(missing)})",
            fix="start the command on every node with srun inside a SLURM allocation (one task per device), "
                "or set MASTER_ADDR, MASTER_PORT and NODE_RANK on each node (see README, Running on a cluster)")
    if strategy == "fsdp":
        import torch

        if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
            raise DomainFMError("--strategy fsdp needs GPUs (Lightning's FSDP runs only on a CUDA accelerator)",
                                fix="use --strategy ddp on CPU, or run on GPUs")


def shard(items: list, rank: int, world_size: int) -> list:
    """Rank ``rank``'s share of ``items`` out of ``world_size``: every ``world_size``-th item from
    ``rank`` on. The shares are disjoint, their union is ``items``, and their sizes differ by at most
    one; the same list in the same order gives every process the same split without talking."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of world size {world_size}")
    return list(items)[rank::world_size]


# ---------------------------------------------------------------- ranks and the rank-0 -> worker hand-off

def is_global_zero() -> bool:
    """True in the launching process (before Lightning spawns its workers) and on global rank 0.

    Read from the launcher's environment (``RANK``/``SLURM_PROCID``, else ``LOCAL_RANK`` and
    ``NODE_RANK``), so it answers before any process group exists."""
    import os

    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var]) == 0
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


#: The hand-off variables (see :func:`handoff_to_workers`).
RUN_ID_VAR = "DOMAINFM_RUN_ID"
CKPT_DIR_VAR = "DOMAINFM_CKPT_DIR"


@contextlib.contextmanager
def handoff_to_workers(run_id: str, ckpt_dir: str | Path) -> Iterator[None]:
    """Rank 0 tells the worker processes Lightning is about to start which run they belong to.

    The protocol: with ``--devices N`` on one machine, Lightning's DDP/FSDP launcher starts the
    workers inside ``trainer.fit`` by re-running the same command line, each with its ``LOCAL_RANK``;
    they inherit rank 0's environment at that moment. Rank 0 alone opens the MLflow run and makes the
    checkpoint folder, then wraps ``fit`` in this context, which sets

    - ``DOMAINFM_RUN_ID``: the MLflow run id (a process that starts as rank 0 with it set reopens
      that run instead of opening a new one),
    - ``DOMAINFM_CKPT_DIR``: the folder every rank writes checkpoints into,

    and restores the previous values (or their absence) when ``fit`` returns or fails: a process
    that runs a second job afterwards (a notebook, a test session) is not handed this run's id.
    Workers read them with :func:`handed_off`. Jobs started by an outer launcher (``srun``,
    ``torchrun``) start every rank at once, see no hand-off, and fall back to defaults."""
    import os

    values = {RUN_ID_VAR: str(run_id), CKPT_DIR_VAR: str(ckpt_dir)}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def handed_off() -> tuple[str | None, Path | None]:
    """``(run_id, ckpt_dir)`` that rank 0 handed this process (see :func:`handoff_to_workers`);
    ``None`` for each one not set."""
    import os

    ckpt = os.environ.get(CKPT_DIR_VAR)
    return os.environ.get(RUN_ID_VAR) or None, Path(ckpt) if ckpt else None
