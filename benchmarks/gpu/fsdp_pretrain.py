"""The FSDP path of ``domainfm pretrain`` on GPUs: train, checkpoint, resume, export.

Lightning (and torch's FSDP) run FSDP only on CUDA, so the CPU test suite cannot exercise it
(tests/test_pretrain.py::test_fsdp_two_cpu_processes is skipped with Lightning's own reason). This
script runs the same task and Trainer that ``domainfm pretrain --strategy fsdp`` builds, on random
in-memory batches (no MLflow, torchgeo or rasterio needed), and checks:

1. training runs under FSDPStrategy and the weight-decay groups are those of the unwrapped model
   (FSDP shows shards as flat slices; the task records the real ndims before wrapping);
2. the EMA teacher moved away from its start and from the student;
3. the exported safetensors file equals the teacher's full (gathered) state, tensor for tensor;
4. a resumed fit starts at the checkpoint's step and ends at the new --max-steps;
5. ``domainfm pretrain``'s own job (``jobs.run_pretraining``, on the toy plugin of the tests; needs
   mlflow) run under FSDP and then with ``--resume`` continues the SAME MLflow run: the same run id,
   one run in the experiment, and the loss curve logged at steps 0..N-1 once each (the resumed fit
   logs from the checkpoint's step on, not from 0 again).

Run on a GPU machine (every rank runs this file; Lightning launches the others):

    PYTHONPATH=. python benchmarks/gpu/fsdp_pretrain.py --devices 1   # ~30 s on one H200
    PYTHONPATH=. python benchmarks/gpu/fsdp_pretrain.py --devices 2   # sharded: 2+ GPUs

Check 5 alone, with DDP on CPU (the same property, as tests/test_pretrain.py checks it):

    PYTHONPATH=. python benchmarks/gpu/fsdp_pretrain.py --mlflow-only --strategy ddp --accelerator cpu --devices 2

Prints one JSON line per part on rank 0; each failed check is one line on stderr
(``fsdp_pretrain: check failed: NAME (DETAILS)``) and the exit status is 1.
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
    ap.add_argument("--mlflow-only", action="store_true", help="run check 5 only")
    ap.add_argument("--strategy", default="fsdp", help="check 5's strategy (fsdp; ddp for a CPU dry run)")
    ap.add_argument("--accelerator", default="gpu", help="check 5's accelerator (gpu; cpu for a CPU dry run)")
    args = ap.parse_args()

    # all ranks must agree on the folder: rank 0's launcher exports it to the workers it starts
    work = Path(args.out or os.environ.get("DOMAINFM_FSDP_WORK") or tempfile.mkdtemp(prefix="fsdp_"))
    os.environ["DOMAINFM_FSDP_WORK"] = str(work)
    checks: list[tuple[str, bool, str]] = []
    if not args.mlflow_only:
        fsdp_checks(args, work, checks)
    mlflow_resume_checks(args, work, checks)
    if checks:  # rank 0 only
        failed = [(name, detail) for name, good, detail in checks if not good]
        for name, detail in failed:
            print(f"fsdp_pretrain: check failed: {name} ({detail})", file=sys.stderr, flush=True)
        print(json.dumps({"ok": not failed, "checks": len(checks), "failed": [n for n, _ in failed]}), flush=True)
        return 1 if failed else 0
    return 0


def check(checks: list, name: str, good: bool, detail: object) -> bool:
    checks.append((name, bool(good), str(detail)))
    return bool(good)


def fsdp_checks(args, work: Path, checks: list) -> None:
    """Checks 1-4: the task and Trainer of ``pretrain --strategy fsdp`` on random in-memory views."""

    import lightning as L
    import torch
    from safetensors.torch import load_file
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.utils.data import DataLoader, Dataset

    from domainfm.backbones import create_backbone, save_backbone
    from domainfm.config import RunConfig
    from domainfm.tasks.pretrain import FSDP_UNITS, ContinualPretrainingTask, exportable_teacher
    from domainfm.training import _no_decay, build_trainer

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
        check(checks, "strategy is FSDPStrategy", strategy == "FSDPStrategy", strategy)
        check(checks, "first fit reaches --steps", trainer.global_step == args.steps,
              f"global_step {trainer.global_step}, expected {args.steps}")
        check(checks, "weight-decay groups of the unwrapped model", decay == expected_decay,
              f"{decay} decayed tensors, expected {expected_decay}")
        check(checks, "export equals the full teacher", same, "safetensors differ from summon_full_params")
        check(checks, "teacher moved from its start", moved > 0, f"max change {moved}")
        check(checks, "teacher differs from student", apart > 0, f"max difference {apart}")
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
        check(checks, "resumed fit starts at the checkpoint's step", seen.get("start") == args.steps,
              f"started at {seen.get('start')}, expected {args.steps}")
        check(checks, "resumed fit reaches the new --max-steps", trainer2.global_step == more,
              f"global_step {trainer2.global_step}, expected {more}")
        check(checks, "resumed run exports the full teacher", task2.full_teacher_state is not None,
              "no full teacher state after the resumed fit")
        print(json.dumps(resumed), flush=True)


def mlflow_resume_checks(args, work: Path, checks: list) -> None:
    """Check 5: ``jobs.run_pretraining`` (what ``domainfm pretrain`` runs) twice, the second with
    ``--resume``, on the toy plugin's in-memory scenes; the MLflow store is a sqlite file in ``work``."""
    try:
        import mlflow  # noqa: F401
    except ImportError:
        if os.environ.get("LOCAL_RANK", "0") == "0":
            check(checks, "MLflow run continued on resume", False, "mlflow is not installed: pip install mlflow")
        return
    repo = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(repo / "tests" / "data" / "toy_plugin"))
    from domainfm_toy import plugin

    from domainfm import jobs
    from domainfm.config import RunConfig

    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    steps, more = args.steps, args.steps + args.steps // 2

    def config(max_steps: int, resume: bool) -> RunConfig:
        return RunConfig(plugin="toy", backbone=args.backbone, init="random", img_size=args.img_size, batch_size=8,
                         proj_dim=32, max_steps=max_steps, checkpoint_every=args.steps // 2, keep_checkpoints=2,
                         strategy=args.strategy, devices=args.devices, accelerator=args.accelerator,
                         output_dir=str(work / "runs"), experiment="fsdp-mlflow", resume=resume,
                         options={"bands": 4, "num_samples": 64})

    first = jobs.run_pretraining(config(steps, False), plugin)
    second = jobs.run_pretraining(config(more, True), plugin)
    if first is None or second is None:  # a worker process: rank 0 checks
        return
    client = mlflow.MlflowClient()
    run_id = first["mlflow_run_id"]
    runs = client.search_runs([client.get_run(run_id).info.experiment_id])
    logged = sorted(m.step for m in client.get_metric_history(run_id, "loss/total"))
    print(json.dumps({"run": "mlflow_resume", "strategy": args.strategy, "first_run_id": run_id,
                      "resumed_run_id": second["mlflow_run_id"], "runs_in_experiment": len(runs),
                      "global_step": second["global_step"], "loss_steps": logged}), flush=True)
    check(checks, "resumed run keeps the MLflow run id", second["mlflow_run_id"] == run_id,
          f"{second['mlflow_run_id']} after {run_id}")
    check(checks, "one MLflow run in the experiment", len(runs) == 1, f"{len(runs)} runs")
    check(checks, "resumed job reaches the new --max-steps", second["global_step"] == more,
          f"global_step {second['global_step']}, expected {more}")
    check(checks, "loss curve continues at the right step", logged == list(range(more)),
          f"steps logged {logged}, expected 0..{more - 1} once each")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # the traceback for the record, then the one line that says it failed
        import traceback

        traceback.print_exc()
        print(f"fsdp_pretrain: error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
              file=sys.stderr, flush=True)
        sys.exit(1)
