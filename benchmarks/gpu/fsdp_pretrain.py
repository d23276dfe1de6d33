"""The FSDP path of ``domainfm pretrain`` on GPUs: train, checkpoint, resume, export.

Lightning (and torch's FSDP) run FSDP only on CUDA, so the CPU test suite cannot exercise it
(tests/test_pretrain.py::test_fsdp_two_cpu_processes is skipped with Lightning's own reason). This
script runs the same task and Trainer that ``domainfm pretrain --strategy fsdp`` builds, on random
in-memory batches (no MLflow, torchgeo or rasterio needed), and checks:

1. training runs under FSDPStrategy and the weight-decay groups are those of the unwrapped model
   (FSDP shows shards as flat slices; the task records the real ndims before wrapping);
2. the EMA teacher moved away from its start and from the student;
3. the exported safetensors file equals the teacher's full (gathered) state, tensor for tensor;
4. a resumed fit starts at the checkpoint's step and ends at the new --max-steps.

Run on a GPU machine (every rank runs this file; Lightning launches the others):

    PYTHONPATH=. python benchmarks/gpu/fsdp_pretrain.py --devices 1   # ~30 s on one H200
    PYTHONPATH=. python benchmarks/gpu/fsdp_pretrain.py --devices 2   # sharded: 2+ GPUs

Prints one JSON line per check on rank 0 and exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--backbone", default="vit_small_patch14_dinov2")
    ap.add_argument("--img-size", type=int, default=56)
    ap.add_argument("--out", default=None, help="working folder (default: a fresh temporary one)")
    args = ap.parse_args()

    import lightning as L
    import torch
    from safetensors.torch import load_file
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.utils.data import DataLoader, Dataset

    from domainfm.backbones import create_backbone, save_backbone
    from domainfm.config import RunConfig
    from domainfm.tasks.pretrain import FSDP_UNITS, ContinualPretrainingTask, exportable_teacher
    from domainfm.training import _no_decay, build_trainer

    # all ranks must agree on the folder: rank 0's launcher exports it to the workers it starts
    work = Path(args.out or os.environ.get("DOMAINFM_FSDP_WORK") or tempfile.mkdtemp(prefix="fsdp_"))
    os.environ["DOMAINFM_FSDP_WORK"] = str(work)
    in_chans, n_labels = 4, 5

    class RandomViews(Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            x = torch.randn(in_chans, args.img_size, args.img_size, generator=g)
            return {"view_teacher": x, "view_student": x + 0.1 * torch.randn(x.shape, generator=g),
                    "labels": (torch.rand(n_labels, generator=g) > 0.5).float()}

    def config(max_steps: int) -> RunConfig:
        return RunConfig(backbone=args.backbone, init="random", img_size=args.img_size, batch_size=8,
                         proj_dim=32, max_steps=max_steps, checkpoint_every=args.steps // 2, keep_checkpoints=2,
                         strategy="fsdp", devices=args.devices, accelerator="gpu", in_chans=in_chans,
                         output_dir=str(work), experiment="fsdp")

    def new_task(cfg: RunConfig) -> ContinualPretrainingTask:
        L.seed_everything(0, verbose=False)
        return ContinualPretrainingTask(cfg.to_dict(), in_chans, backbone=create_backbone(cfg, in_chans=in_chans))

    report: dict[str, object] = {}
    ok = True
    ckpt_dir = work / "checkpoints"

    # ---- first run
    cfg = config(args.steps)
    task = new_task(cfg)
    start = {k: v.detach().clone() for k, v in task.teacher.backbone.model.state_dict().items()}
    expected_decay = sum(1 for n, p in task.student.named_parameters() if not _no_decay(n, p))
    trainer = build_trainer(cfg, ckpt_dir=ckpt_dir, logger=False, fsdp_wrap=FSDP_UNITS, enable_progress_bar=False)
    trainer.fit(task, DataLoader(RandomViews(), batch_size=8, num_workers=0))
    zero = trainer.is_global_zero
    strategy = type(trainer.strategy).__name__
    decay = sum(len(g["params"]) for g in trainer.optimizers[0].param_groups if g["weight_decay"] > 0)
    # the teacher's full weights, gathered independently of the export path (a collective: all ranks)
    with FSDP.summon_full_params(trainer.strategy.model, writeback=False, rank0_only=True):
        full = {k: v.detach().float().cpu().clone() for k, v in task.teacher.backbone.model.state_dict().items()}
        student = {k: v.detach().float().cpu().clone() for k, v in task.student.backbone.model.state_dict().items()}
    if zero:
        exported = save_backbone(exportable_teacher(task, cfg), work / "backbone.safetensors")
        saved = load_file(str(exported))
        same = sorted(saved) == sorted(full) and all(torch.equal(saved[k].float(), full[k]) for k in full)
        moved = max(float((full[k] - start[k].float().cpu()).abs().max()) for k in full)
        apart = max(float((full[k] - student[k]).abs().max()) for k in full)
        report.update(strategy=strategy, world_size=trainer.world_size, global_step=trainer.global_step,
                      decay_params=decay, decay_params_expected=expected_decay,
                      export_equals_full_teacher=same, teacher_moved=moved, teacher_minus_student=apart)
        ok &= strategy == "FSDPStrategy" and trainer.global_step == args.steps and decay == expected_decay
        ok &= same and moved > 0 and apart > 0
        print(json.dumps({"run": "first", **report}), flush=True)

    # ---- resume from last.ckpt to 1.5x the steps
    more = args.steps + args.steps // 2
    cfg2 = config(more)
    task2 = new_task(cfg2)
    seen: dict[str, int] = {}

    class FirstStep(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["start"] = trainer.global_step

    trainer2 = build_trainer(cfg2, ckpt_dir=ckpt_dir, logger=False, fsdp_wrap=FSDP_UNITS,
                             callbacks=[FirstStep()], enable_progress_bar=False)
    trainer2.fit(task2, DataLoader(RandomViews(), batch_size=8, num_workers=0), ckpt_path=str(ckpt_dir / "last.ckpt"))
    if trainer2.is_global_zero:
        resumed = {"run": "resume", "started_at": seen.get("start"), "global_step": trainer2.global_step,
                   "exported_after_resume": task2.full_teacher_state is not None}
        ok &= seen.get("start") == args.steps and trainer2.global_step == more and task2.full_teacher_state is not None
        print(json.dumps(resumed), flush=True)
        print(json.dumps({"ok": bool(ok)}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
