"""Peak memory of one fine-tuning step: SGD with a frozen embedding layer against AdamW.

    python benchmarks/sgd_memory.py [--backbone vit_base_patch16_224] [--batch-size 8] [--img-size 224]
                                    [--device cpu|cuda|all] [--precision 32-true|bf16-mixed]

Each arm runs in its own fresh process, side by side (see plugins/sgd_ft/memory.py): the same
random-init model, batch and head, one warm-up step, then two measured steps. CPU figures are the
growth of the resident set's high-water mark; CUDA figures are torch.cuda.max_memory_allocated.
Printed: each arm's trainable parameters, optimizer state (exact bytes of every tensor in
optimizer.state), state bytes per trainable parameter and peak step memory, then the ratios
SGD-frozen-embed / AdamW. The per-parameter state ratio is exactly 0.5 (4 vs 8 bytes); the
whole-step ratio is what the paper's memory claim is about.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ARMS = (("sgd-frozen-embed", "sgd", True), ("sgd", "sgd", False), ("adamw", "adamw", False))


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def run(device: str, args) -> dict[str, dict]:
    from plugins.sgd_ft.memory import measure_many, probe_spec

    specs = [probe_spec(backbone=args.backbone, in_chans=3, img_size=args.img_size, batch_size=args.batch_size,
                        num_outputs=args.num_classes, task="multiclass", optimizer=opt, momentum=0.9,
                        freeze_embed=freeze, freeze_pos_embed=False, precision=args.precision, device=device)
             for _, opt, freeze in ARMS]
    t0 = time.perf_counter()
    results = measure_many(specs, parallel=device == "cpu" and not args.serial)
    print(f"\n[{device}] {args.backbone}, batch {args.batch_size}, {args.img_size}px, {args.precision} "
          f"({time.perf_counter() - t0:.0f} s)")
    print(f"{'arm':18s} {'trainable':>12s} {'frozen':>9s} {'opt. state':>13s} {'B/param':>8s} {'peak step':>13s}")
    out = {}
    for (name, _, _), r in zip(ARMS, results):
        out[name] = r
        print(f"{name:18s} {r['trainable_params']:12,d} {r['frozen_params']:9,d} "
              f"{mib(r['optimizer_state_bytes']):>13s} {r['optimizer_state_bytes_per_param']:8.1f} "
              f"{mib(r['peak_memory_bytes']):>13s}")
    s, a = out["sgd-frozen-embed"], out["adamw"]
    per_param = s["optimizer_state_bytes_per_param"] / a["optimizer_state_bytes_per_param"]
    print(f"ratio sgd-frozen-embed / adamw: optimizer state per trainable parameter {per_param:.4f} "
          f"({'exactly 0.5' if per_param == 0.5 else 'NOT 0.5'}), "
          f"total optimizer state {s['optimizer_state_bytes'] / a['optimizer_state_bytes']:.4f}, "
          f"whole training step {s['peak_memory_bytes'] / a['peak_memory_bytes']:.4f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="vit_base_patch16_224")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--precision", default="32-true", choices=("32-true", "bf16-mixed"))
    ap.add_argument("--device", default="all", choices=("cpu", "cuda", "all"),
                    help="all: the CPU, and CUDA when a GPU is present")
    ap.add_argument("--serial", action="store_true", help="run the CPU arms one after the other")
    args = ap.parse_args()
    import torch

    devices = ["cpu"] if args.device in ("cpu", "all") else []
    if args.device == "cuda" or (args.device == "all" and torch.cuda.is_available()):
        devices.append("cuda")
    for device in devices:
        run(device, args)


if __name__ == "__main__":
    main()
