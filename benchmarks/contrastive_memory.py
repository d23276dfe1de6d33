"""Peak memory and time of the chunked SoftCon loss against the dense one (forward + backward).

Targets (issue, section 3): at N = 16384, embedding dim 256, the chunked loss peaks at <= 10% of
the dense loss's memory and takes <= 1.5x its time.

Every (N, mode) runs in a fresh subprocess so that one configuration's high-water mark cannot hide
another's. On CPU the peak is the rise of ``ru_maxrss`` over a baseline taken after importing
torch, allocating the inputs and running the loss once on a tiny batch (which loads the kernels
and thread pools both modes need); tracemalloc cannot see torch's allocations. On CUDA
(``--device cuda``) it is ``torch.cuda.max_memory_allocated`` over the memory allocated after
the inputs. Times are the best of ``--repeats`` forward + backward passes.

    python benchmarks/contrastive_memory.py                       # N = 4096 and 16384 on CPU
    python benchmarks/contrastive_memory.py --device cuda --sizes 16384 65536
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _measure(args: argparse.Namespace) -> dict:
    """Child process: one (N, mode); prints its numbers as JSON."""
    import resource

    import torch

    from domainfm.losses import soft_contrastive_loss

    device = torch.device(args.device)
    chunk_size = args.chunk_size if args.mode == "chunked" else None
    options = dict(symmetric=args.symmetric, soft_target=args.soft_target, label_similarity=args.label_similarity)

    def inputs(n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        z_teacher = torch.randn(n, args.dim, generator=g).to(device).requires_grad_()
        z_student = torch.randn(n, args.dim, generator=g).to(device).requires_grad_()
        labels = (torch.rand(n, args.classes, generator=g) < 0.3).float().to(device)
        return z_teacher, z_student, labels

    def step(z_teacher, z_student, labels, chunk):
        z_teacher.grad = z_student.grad = None
        soft_contrastive_loss(z_teacher, z_student, labels, chunk_size=chunk, **options).total.backward()

    step(*inputs(64, 1), chunk=None if chunk_size is None else 16)  # warm-up: kernels, thread pools
    z_teacher, z_student, labels = inputs(args.n, 0)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step(z_teacher, z_student, labels, chunk_size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return {"n": args.n, "mode": args.mode, "peak_mib": peak / 2**20, "seconds": min(times)}


def _run_child(args: argparse.Namespace, n: int, mode: str) -> dict:
    command = [sys.executable, __file__, "--child", "--n", str(n), "--mode", mode]
    for flag in ("dim", "classes", "chunk_size", "repeats", "device", "soft_target", "label_similarity"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.symmetric:
        command.append("--symmetric")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: the {mode} run at N={n} failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384], help="batch sizes N to measure")
    parser.add_argument("--dim", type=int, default=256, help="embedding dimension")
    parser.add_argument("--classes", type=int, default=10, help="labels per sample vector (30%% set)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="rows per block of the chunked loss")
    parser.add_argument("--repeats", type=int, default=2, help="forward+backward passes timed (best kept)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--symmetric", action="store_true", help="both directions (the heavier case)")
    parser.add_argument("--soft-target", default="ce", choices=["ce", "bce"])
    parser.add_argument("--label-similarity", default="cosine", choices=["cosine", "jaccard"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["dense", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(_measure(args)))
        return

    print(f"SoftCon loss, forward + backward, dim {args.dim}, chunk {args.chunk_size}, device {args.device}, "
          f"symmetric={args.symmetric}, {args.label_similarity}/{args.soft_target}")
    header = f"{'N':>7} {'dense MiB':>10} {'chunked MiB':>12} {'peak ratio':>11} {'dense s':>9} {'chunked s':>10} {'time ratio':>11}"
    print(header)
    print("-" * len(header))
    for n in args.sizes:
        dense = _run_child(args, n, "dense")
        chunked = _run_child(args, n, "chunked")
        peak_ratio = chunked["peak_mib"] / max(dense["peak_mib"], 1e-9)
        time_ratio = chunked["seconds"] / dense["seconds"]
        print(f"{n:>7} {dense['peak_mib']:>10.1f} {chunked['peak_mib']:>12.1f} {peak_ratio:>10.1%} "
              f"{dense['seconds']:>9.3f} {chunked['seconds']:>10.3f} {time_ratio:>10.2f}x", flush=True)
    print("targets at N = 16384: peak ratio <= 10%, time ratio <= 1.5x")


if __name__ == "__main__":
    main()
