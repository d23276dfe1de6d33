"""Images/s of a domainfm pretraining step against a bare PyTorch loop of the same model, loss,
masking and optimizer; bf16 against fp32; achieved model FLOP/s as a fraction of a matmul peak
measured in the same run.

Targets: domainfm / bare >= 0.95 (the Lightning task adds no real overhead).

    python benchmarks/pretrain_throughput.py [--backbone vit_small_patch14_dinov2] [--img-size 112]
        [--batch-size 32] [--steps 10] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time

import torch


def make_task(args):
    from domainfm.backbones import create_backbone
    from domainfm.config import RunConfig
    from domainfm.tasks.pretrain import ContinualPretrainingTask

    cfg = RunConfig(backbone=args.backbone, init="random", img_size=args.img_size, in_chans=args.in_chans,
                    batch_size=args.batch_size, lr=1e-4, warmup_steps=0, plugin="bench")
    torch.manual_seed(0)
    bb = create_backbone(args.backbone, in_chans=args.in_chans, img_size=args.img_size, init="random")
    return ContinualPretrainingTask(cfg.to_dict(), args.in_chans, backbone=bb)


def batches(args, n):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, args.in_chans, args.img_size, args.img_size, generator=g)
    y = (torch.rand(args.batch_size, 9, generator=g) > 0.6).float()
    return [{"view_teacher": x, "view_student": x.flip(-1), "labels": y} for _ in range(n)]


def run_lightning(args, precision: str) -> float:
    import lightning as L
    from torch.utils.data import DataLoader

    task = make_task(args)
    data = batches(args, args.warmup + args.steps)
    times: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, *a):
            times.append(time.perf_counter())

        def on_train_end(self, trainer, *a):
            times.append(time.perf_counter())

    loader = DataLoader(data, batch_size=None)
    trainer = L.Trainer(accelerator=args.device, devices=1, precision=precision, max_steps=len(data), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Clock()])
    trainer.fit(task, loader)
    dt = times[-1] - times[args.warmup]
    return args.steps * args.batch_size / dt


def run_bare(args, precision: str) -> float:
    """The same step written by hand: masked student, EMA teacher, SoftCon loss, AdamW, cosine LR."""
    from domainfm.losses import soft_contrastive_loss
    from domainfm.masking import random_keep_indices
    from domainfm.training import ema_momentum, param_groups, warmup_cosine

    task = make_task(args).to(args.device)
    student, teacher = task.student, task.teacher
    opt = torch.optim.AdamW(param_groups(student, 0.05, lr=1e-4), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, 0, 1000, final=0.01))
    data = batches(args, args.warmup + args.steps)
    dtype = torch.bfloat16 if precision == "bf16-mixed" else None
    t0 = None
    for i, b in enumerate(data):
        if i == args.warmup:
            t0 = time.perf_counter()
        xs, xt, y = (b["view_student"].to(args.device), b["view_teacher"].to(args.device), b["labels"].to(args.device))
        with torch.autocast(args.device, dtype=dtype or torch.float32, enabled=dtype is not None):
            keep = random_keep_indices(xs.shape[0], student.backbone.num_patches, 0.5, device=xs.device)
            zs = student(xs, keep)
            with torch.no_grad():
                zt = teacher(xt)
            loss = soft_contrastive_loss(zt.float(), zs.float(), y).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        m = ema_momentum(i, 1000, 0.996)
        with torch.no_grad():
            for pt, ps in zip(teacher.parameters(), student.parameters()):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)
    if args.device == "cuda":
        torch.cuda.synchronize()
    return args.steps * args.batch_size / (time.perf_counter() - t0)


def step_flops(args) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from domainfm.losses import soft_contrastive_loss
    from domainfm.masking import random_keep_indices

    task = make_task(args)
    b = batches(args, 1)[0]
    with FlopCounterMode(display=False) as fc:
        keep = random_keep_indices(args.batch_size, task.student.backbone.num_patches, 0.5)
        zs = task.student(b["view_student"], keep)
        with torch.no_grad():
            zt = task.teacher(b["view_teacher"])
        soft_contrastive_loss(zt, zs, b["labels"]).total.backward()
    return fc.get_total_flops()


def matmul_peak(device: str, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="vit_small_patch14_dinov2")
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--in-chans", type=int, default=13)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats; the best of each is kept")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    print(f"{args.backbone}, {args.in_chans} bands, {args.img_size}px, batch {args.batch_size}, "
          f"{args.steps} timed steps on {args.device} ({torch.get_num_threads()} threads)")
    flops = step_flops(args)
    rows = []
    for precision in ("32-true", "bf16-mixed"):
        # alternate the two loops and keep each one's best, so a passing load on the machine
        # does not land on one side only
        bare = 0.0
        dfm = 0.0
        for _ in range(args.repeats):
            bare = max(bare, run_bare(args, precision))
            dfm = max(dfm, run_lightning(args, precision))
        rows.append((precision, dfm, bare))
    peak32 = matmul_peak(args.device, torch.float32)
    peak16 = matmul_peak(args.device, torch.bfloat16)
    print(f"\n{'precision':12s} {'domainfm img/s':>15s} {'bare img/s':>11s} {'ratio':>7s} {'model TFLOP/s':>14s} {'% of matmul peak':>17s}")
    for precision, dfm, bare in rows:
        achieved = flops / args.batch_size * dfm
        peak = peak16 if precision == "bf16-mixed" else peak32
        print(f"{precision:12s} {dfm:15.1f} {bare:11.1f} {dfm / bare:7.3f} {achieved / 1e12:14.3f} {achieved / peak:17.1%}")
    print(f"\nbf16 / fp32 speed-up (domainfm): {rows[1][1] / rows[0][1]:.2f}x")
    print(f"matmul peak: fp32 {peak32 / 1e12:.2f} TFLOP/s, bf16 {peak16 / 1e12:.2f} TFLOP/s; "
          f"model {flops / 1e9:.1f} GFLOP per step")
    worst = min(d / b for _, d, b in rows)
    print(f"domainfm / bare worst ratio {worst:.3f} (target >= 0.95): {'OK' if worst >= 0.95 else 'MISSED'}")


if __name__ == "__main__":
    main()
