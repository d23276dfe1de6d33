"""Everything about processes and ranks: gathering a batch across processes so that contrastive
losses see the global batch, launcher detection, which process is rank 0 (:func:`is_global_zero`),
how rank 0 hands its MLflow run to the workers Lightning starts (:func:`handoff_to_workers`), and
how one rank's error ends every rank at once (:func:`end_job_on_rank_failure`,
:func:`rank_failure_callback`).

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
        raise DomainFMError(f"--num-nodes must be at least 1, got {num_nodes}", fix="pass --num-nodes 1 or more")
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


# ---------------------------------------------------------------- one failing rank ends the whole job

#: Store keys of the failure protocol (see :func:`end_job_on_rank_failure`).
FAILED_KEY = "domainfm/failed"
STOPPED_KEY = "domainfm/stopped"
#: Seconds a rank that stops waits for the others (a backstop: they normally answer within a poll).
STOP_GRACE_S = 30.0
POLL_S = 0.25
#: Seconds the job's store must stay unreachable before a worker concludes that rank 0 (its host) is
#: gone: a worker's last collective returns a moment before rank 0 may end, so one miss is not enough.
STORE_GONE_S = 5.0


class PeerRankFailed(BaseException):
    """Raised in a rank's main thread when another rank of the job failed. A BaseException, like
    KeyboardInterrupt, so that a per-item ``except Exception`` (one slide's failure) does not take
    it for the item's own error."""


def _rank_failed_class():
    from domainfm.errors import DomainFMError

    class _RankFailed(DomainFMError):
        """A DomainFMError of one rank, its text prefixed with ``rank R of W:``."""

        def __init__(self, text: str, original: BaseException):
            Exception.__init__(self, text)
            self.path = getattr(original, "path", None)
            self.fix = getattr(original, "fix", None)

    return _RankFailed


def _one_line(exc: BaseException) -> str:
    from domainfm.errors import DomainFMError

    text = [line for line in str(exc).strip().splitlines() if line.strip()]
    if len(text) > 1 and text[0].startswith("Caught ") and "Original Traceback" in str(exc):
        return text[-1].strip()  # raised in a DataLoader worker: the original error's own line
    msg = text[0].strip() if text else ""
    return msg if isinstance(exc, DomainFMError) else f"{type(exc).__name__}: {msg}".rstrip(": ")


def _node_rank() -> int:
    import os

    for var in ("NODE_RANK", "GROUP_RANK", "SLURM_NODEID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _say(line: str) -> None:
    import sys

    print(line, file=sys.stderr, flush=True)


def _lightning_observer():
    """Lightning's ``child-process-observer`` thread of this process, if its subprocess launcher
    started workers here (private API of Lightning 2.x: ``_child_processes``, ``_run``; used
    defensively, nothing is done when it is absent or shaped otherwise)."""
    import threading

    for t in threading.enumerate():
        if t.name == "child-process-observer" and hasattr(t, "_child_processes"):
            return t
    return None


def _disarm_lightning_observer(while_watching: "_RankGuard | None" = None) -> None:
    """Keep Lightning's observer from SIGKILLing this process and its workers (exit 137, no
    word, the MLflow run left RUNNING) when a worker dies: this guard sees the dead worker and
    ends the job itself, with a line. ``while_watching``: only while that guard watches (after it
    stops, the observer does its job again); None: for good."""
    observer = _lightning_observer()
    if observer is None:
        return
    if while_watching is None:
        observer._run = lambda: True  # its loop ends at its next check without killing anyone
        return
    check = type(observer)._run.__get__(observer)

    def _run() -> bool:
        return False if not while_watching.done.is_set() else check()

    observer._run = _run


class _RankGuard:
    """The failure protocol of one process (see :func:`end_job_on_rank_failure`)."""

    def __init__(self):
        import os
        import threading

        self.main = threading.get_ident()
        self.ppid = os.getppid()
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.handling = False
        self.sent = False
        self.store = None
        self.rank = self.world = None
        self.thread = None
        self.store_lost_at = None  # monotonic time of the first failed store call in a row
        # started by Lightning's launcher on this node (not by srun/torchrun): its parent is a rank
        self.launched_here = os.environ.get("LOCAL_RANK", "0") != "0" and launcher_environment() in (None, "env")

    # -- state shared with the other ranks
    def attach(self) -> bool:
        """Find the job's store (the default process group's) once a group of > 1 process exists."""
        if self.store is not None:
            return True
        if not is_distributed():
            return False
        import torch.distributed as dist

        self.store = dist.distributed_c10d._get_default_store()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        return True

    def record(self) -> dict | None:
        import json

        import time

        try:
            if self.store.check([FAILED_KEY]):
                return json.loads(self.store.get(FAILED_KEY))
        except Exception:  # noqa: BLE001 - the store's host (rank 0) has ended
            if self.store_lost_at is None:
                self.store_lost_at = time.monotonic()
            return None
        self.store_lost_at = None
        return None

    # -- processes that die without a word (SIGKILL, the out-of-memory killer, a crash in C)
    def _children(self) -> list:
        """The worker processes this one launched (Lightning's subprocess launcher, in the local
        rank 0 of a node): they are what its ``child-process-observer`` thread watches."""
        observer = _lightning_observer()
        return list(getattr(observer, "_child_processes", None) or [])

    def dead_child_record(self) -> dict | None:
        """A record of the first launched worker that ended non-zero without recording a failure
        (killed by a signal, or a crash in native code: a worker that fails through this protocol
        records first and outlives its launcher), stored as the job's failure; None when every
        worker is alive or ended cleanly. Disarms Lightning's observer first, which would otherwise
        SIGKILL this process (exit 137, no word, the MLflow run left RUNNING) within 5 s."""
        import json
        import signal

        for i, proc in enumerate(self._children()):
            code = proc.poll()
            if not code:
                continue
            if self.record() is not None:  # it failed through the protocol: handled as usual
                return None
            _disarm_lightning_observer()
            rank = (self.rank or 0) + i + 1  # Lightning numbers a node's children after its rank 0
            if code < 0:
                name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
                why = f"was killed by {name}" + (" (often the kernel's out-of-memory killer: check `dmesg`, "
                                                 "or lower --batch-size)" if -code == signal.SIGKILL else "")
            else:
                why = f"ended with exit status {code} without reporting an error (a crash in native code?)"
            rec = {"rank": rank, "node": _node_rank(), "code": 1,
                   "line": f"rank {rank} of {self.world} (PID {proc.pid}) {why}; what finished is kept: "
                           f"rerun the same command to resume"}
            try:
                first = json.loads(self.store.compare_set(FAILED_KEY, "", json.dumps(rec)))
            except Exception:  # noqa: BLE001
                first = rec
            if first == rec:
                _say(f"error: {rec['line']}")
            return first
        return None

    def _store_unreachable(self) -> bool:
        """Ask the store until it answers or :data:`STORE_GONE_S` pass; True if it never did."""
        import time

        end = time.monotonic() + STORE_GONE_S
        while time.monotonic() < end:
            try:
                self.store.check([FAILED_KEY])
                return False
            except Exception:  # noqa: BLE001
                time.sleep(POLL_S)
        return True

    def store_gone(self) -> bool:
        """True once the job's store (hosted by global rank 0) has not answered for
        :data:`STORE_GONE_S` seconds: rank 0 ended without a word (killed, or its machine failed)."""
        import time

        return self.store_lost_at is not None and time.monotonic() - self.store_lost_at >= STORE_GONE_S

    def launcher_gone(self) -> bool:
        """True in a worker that Lightning's launcher started on this node once the launching
        process (the node's local rank 0) has ended: this process was handed to another parent."""
        import os

        return self.launched_here and os.getppid() != self.ppid

    def _end_orphan(self, last_error: str = "") -> None:
        """This worker's job is gone with the rank that launched it or hosts the job's store: say
        so in one line and end now (its finished files are complete, written atomically; nothing
        is left to tell anyone)."""
        import os
        import sys

        if self.launcher_gone():
            gone = f"rank {self.rank - int(os.environ.get('LOCAL_RANK', '0'))}, which launched it,"
        else:
            gone = "rank 0, which hosts the job,"
        cause = f" (last error here: {last_error})" if last_error else ""
        _say(f"error: rank {self.rank} of {self.world} stopped: {gone} is gone without a word (killed, out of "
             f"memory, or its machine failed){cause}; what finished is kept: rerun the same command to resume")
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(1)

    def start(self) -> None:
        import threading

        if self.thread is None:
            _disarm_lightning_observer(while_watching=self)  # this guard's watcher watches the workers
            self.thread = threading.Thread(target=self._watch, name="domainfm-rank-watch", daemon=True)
            self.thread.start()

    def stop(self) -> None:
        self.done.set()

    # -- the watcher thread: another rank failed -> stop this one's main thread
    def _watch(self) -> None:
        import ctypes
        import os

        while not self.done.wait(POLL_S):
            try:
                if not self.attach():
                    continue
            except Exception:  # noqa: BLE001
                return
            if self.launcher_gone():  # before asking its store: a dead host's store logs C++ warnings
                with self.lock:
                    if self.handling:
                        return
                    self._end_orphan()
            rec = self.record()
            if rec is None:
                rec = self.dead_child_record()
            if rec is None and self.rank != 0 and self.store_gone():
                with self.lock:
                    if self.handling:  # the main thread is on its way out and will say it
                        return
                    self._end_orphan()
            if rec is None or rec["rank"] == self.rank:
                continue
            with self.lock:
                if not self.handling:  # the main thread is not already on its way out
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.main),
                                                               ctypes.py_object(PeerRankFailed))
                    self.sent = True
            # backstop: a main thread stuck in C (an NCCL collective) never sees the exception
            if not self.done.wait(STOP_GRACE_S):
                self._say_peer(rec)
                os._exit(int(rec.get("code", 1)))
            return

    def _say_peer(self, rec: dict) -> None:
        import sys

        if rec.get("node") != _node_rank():  # on its own node the failing rank has said it already
            print(f"error: {rec['line']} (rank {self.rank} stopped)", file=sys.stderr, flush=True)

    def _wait(self, until, timeout: float = STOP_GRACE_S) -> None:
        import time

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if until():
                    return
            except Exception:  # noqa: BLE001 - the store went away: rank 0 has ended
                return
            time.sleep(POLL_S / 2)

    def _wait_for_launcher(self) -> None:
        """In a process Lightning's launcher started (local rank > 0 under its own environment):
        wait for the launching process to end first; it SIGKILLs everyone, itself included, when
        a child exits non-zero before it (``_ChildProcessObserver``), which would lose its status."""
        import os

        if self.launched_here:
            self._wait(lambda: os.getppid() != self.ppid)

    def _end_worker(self, code: int) -> None:
        """A rank other than 0, done: wait for the launching process to end (see
        :meth:`_wait_for_launcher`), then exit at once. Its files are written atomically and its
        line said; the interpreter's own teardown (seconds on a loaded machine) buys nothing."""
        import os
        import sys

        self.store = None  # this process's connection to rank 0's store, closed before waiting on rank 0
        self._wait_for_launcher()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)

    # -- the main thread: this rank's exception
    def handle(self, exc: BaseException) -> BaseException:
        """What to raise instead of ``exc`` (``exc`` itself when there is no job to end)."""
        import json
        import sys

        import torch.distributed as dist

        from domainfm.errors import DomainFMError

        with self.lock:
            self.handling = True
            if self.sent:  # an exception the watcher sent may still be pending: cancel it
                import ctypes

                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.main), None)
        self.done.set()
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            return exc
        try:
            if not self.attach():
                return exc
        except Exception:  # noqa: BLE001
            return exc
        if not isinstance(exc, KeyboardInterrupt) and self.launcher_gone():
            self._end_orphan(_one_line(exc))  # what this rank met (a closed connection) came from that
        code = 2 if isinstance(exc, DomainFMError) else 130 if isinstance(exc, KeyboardInterrupt) else 1
        mine = {"rank": self.rank, "node": _node_rank(), "code": code,
                "line": f"rank {self.rank} of {self.world}: {_one_line(exc)}"}
        # a worker killed outright is the cause of what this rank then meets (a closed connection)
        first = self.record() or self.dead_child_record()
        if first is None and not isinstance(exc, PeerRankFailed):
            try:  # the first failure wins; a later one is its consequence
                first = json.loads(self.store.compare_set(FAILED_KEY, "", json.dumps(mine)))
            except Exception:  # noqa: BLE001 - rank 0 (the store's host) has ended
                first = None
        if first is None:
            if self.rank != 0 and not isinstance(exc, KeyboardInterrupt) and self._store_unreachable():
                self._end_orphan(_one_line(exc))  # rank 0 ended without a word (killed)
            return exc
        # unblock every rank waiting for this one in a collective (gloo: they see the closed pairs)
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
        if first["rank"] != self.rank:  # another rank failed first: stop quietly, with its status
            try:
                self.store.add(STOPPED_KEY, 1)
            except Exception:  # noqa: BLE001
                pass
            self._say_peer(first)
            if self.rank != 0:
                self._end_worker(first["code"])
            return SystemExit(first["code"])
        if self.rank == 0:  # the others stop first, then the command reports as usual
            self._wait(lambda: self.store.add(STOPPED_KEY, 0) >= self.world - 1)
            if isinstance(exc, DomainFMError):
                return _rank_failed_class()(f"rank 0 of {self.world}: {exc}", exc)
            exc.add_note(f"(in rank 0 of {self.world}; the other ranks were stopped)")
            return exc
        # a worker: say it now (its launcher may end it), then wait for rank 0 to end
        if isinstance(exc, DomainFMError):
            print(f"error: {mine['line']}", file=sys.stderr, flush=True)
        else:
            import traceback

            traceback.print_exception(exc)
            print(f"error: {mine['line']}", file=sys.stderr, flush=True)
        self._end_worker(code)
        return SystemExit(code)  # not reached


@contextlib.contextmanager
def end_job_on_rank_failure() -> Iterator[None]:
    """Wrap the part of a multi-process job that runs on every rank (Lightning Fabric's launched
    function; :func:`rank_failure_callback` does the same around ``Trainer.fit``).

    Without it, one rank's exception leaves the others to find out on their own: a rank waiting
    in a collective for it waits for the process group's timeout (NCCL: minutes), a rank still
    computing carries on until its next collective, and Lightning's launcher SIGKILLs the
    launching process when a child it started exits non-zero (exit status 137, no message).

    With it, within a fraction of a second:

    - the first rank to fail records ``rank R of W: <its one-line error>`` in the job's store
      (the default process group's TCPStore) and closes its process group, which ends the
      collectives the others wait in;
    - every other rank's watcher thread sees the record and stops that rank's main thread (a
      :class:`PeerRankFailed`), which ends quietly with the failing rank's exit status (2 for a
      DomainFMError, else 1) - saying the line itself only on another node, whose log would
      otherwise not show it;
    - the failing rank reports as one line ``error: rank R of W: <message>`` (an unexpected error
      keeps its traceback); global rank 0, whose exit status the user sees, ends last.

    Files that ranks finished (written atomically) stay for a rerun. A main thread stuck in C
    (an NCCL collective) is ended with ``os._exit`` after :data:`STOP_GRACE_S` seconds. Does
    nothing in a single process."""
    guard = _RankGuard()
    if guard.attach():
        guard.start()
    try:
        yield
    except BaseException as exc:  # noqa: BLE001 - every exception ends the job
        out = guard.handle(exc)
        if out is exc:
            raise
        raise out from None
    finally:
        guard.stop()


def rank_failure_callback():
    """A Lightning Callback doing what :func:`end_job_on_rank_failure` does, around ``Trainer.fit``
    of a multi-process run: the watcher starts once the process group exists (``setup``), and an
    exception in the loop (``on_exception``, before Lightning's teardown) ends every rank."""
    from lightning.pytorch.callbacks import Callback

    class RankFailureCallback(Callback):
        def __init__(self):
            self.guard = None

        def setup(self, trainer, pl_module, stage):
            self.guard = _RankGuard()
            if self.guard.attach():
                self.guard.start()

        def on_exception(self, trainer, pl_module, exception):
            if self.guard is None:
                return
            out = self.guard.handle(exception)
            if out is not exception:
                raise out from None

        def teardown(self, trainer, pl_module, stage):
            if self.guard is not None:
                self.guard.stop()

    return RankFailureCallback()
