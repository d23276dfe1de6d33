"""Data loading shared by every plugin.

DataLoader worker processes (:func:`loader_kwargs`, :func:`worker_context`, :func:`default_num_workers`):
a process that runs threads (a prefetching thread, MLflow's async logger, Lightning's callbacks,
a pin-memory thread) must not ``fork`` workers: a child forked while another thread holds a lock
(an import lock, h5py's global lock, a logging lock) inherits that lock held, with no thread left to
release it, and waits forever. Workers are therefore started by the ``forkserver`` start method
(``spawn`` where there is none): a clean single-threaded server process forks them, and each worker
unpickles its dataset, so a dataset must be picklable (open files lazily, per worker). Every
``DataLoader`` of the product that may start workers takes its settings from :func:`loader_kwargs`.
"""

from __future__ import annotations

import os
from typing import Any

# what the forkserver imports once, so that each worker it forks starts in milliseconds
_FORKSERVER_PRELOAD = ["torch", "numpy"]
# a batch that takes longer than this in a worker means the worker is stuck: the DataLoader then
# raises (one failed item of work) instead of waiting for ever
WORKER_TIMEOUT_S = 600.0


def default_num_workers(cap: int = 4) -> int:
    """DataLoader workers to use when the user gives none: ``min(cap, CPUs this process may use)``
    (``os.sched_getaffinity``, which respects cgroup/cpuset limits; ``os.cpu_count`` elsewhere).
    torch warns when a DataLoader asks for more workers than that; on a 2-core machine this is 2."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(0, min(int(cap), cpus))


def worker_start_method() -> str:
    """``forkserver`` where the platform has it (Linux, macOS), else ``spawn``; never ``fork``."""
    import multiprocessing as mp

    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


def worker_context(num_workers: int):
    """The multiprocessing context for ``DataLoader(multiprocessing_context=...)``: None without
    workers (nothing is started), else a context that does not fork the calling process."""
    if num_workers <= 0:
        return None
    import multiprocessing as mp

    method = worker_start_method()
    ctx = mp.get_context(method)
    if method == "forkserver":
        # takes effect when the server starts (the first worker of this process); later calls are no-ops
        ctx.set_forkserver_preload(_FORKSERVER_PRELOAD)
    return ctx


def loader_kwargs(num_workers: int, *, persistent: bool = False, prefetch_factor: int | None = None,
                  timeout: float | None = WORKER_TIMEOUT_S) -> dict[str, Any]:
    """Keyword arguments for ``torch.utils.data.DataLoader`` about its workers: ``num_workers``, a
    non-forking ``multiprocessing_context``, ``persistent_workers``, ``prefetch_factor`` and a
    ``timeout`` (seconds per batch) so that a stuck worker ends in an error, not a hang. With
    ``num_workers=0`` only ``num_workers`` is set (torch rejects the others then)."""
    n = max(0, int(num_workers))
    if n == 0:
        return {"num_workers": 0}
    kwargs: dict[str, Any] = {"num_workers": n, "multiprocessing_context": worker_context(n),
                              "persistent_workers": bool(persistent)}
    if prefetch_factor is not None:
        kwargs["prefetch_factor"] = int(prefetch_factor)
    if timeout:
        kwargs["timeout"] = float(timeout)
    return kwargs
