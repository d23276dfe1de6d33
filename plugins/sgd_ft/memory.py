"""Peak memory of one fine-tuning step, measured the same way for every optimizer arm.

On CUDA: ``torch.cuda.max_memory_allocated`` over the steps (every tensor: weights, gradients,
optimizer state, activations). On CPU torch keeps no allocator statistics, so the measurement is
the process's resident memory, in a fresh Python process per spec (``python -m
plugins.sgd_ft.memory SPECS_JSON``; the processes of several specs run side by side): after one
unmeasured warm-up step of the same model, the high-water mark of the resident set (VmHWM, reset
through ``/proc/self/clear_refs``) minus the resident set before the model is built. One process
per spec because measuring specs one after another in one process drifted by up to 10 % (memory
that one spec frees is partly reused or trimmed under the next one's baseline).

Weights are random (their values do not change the memory); the architecture, bands, input size,
batch size, head, freezing, optimizer and precision are those of the run. :class:`MemoryMeter`
measures each (architecture, arm) of a run once.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from plugins.sgd_ft.arms import Arm

PROBE_STEPS = 2  # the first step allocates the optimizer state; the second runs with it in place


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The high-water mark of this process's own address space (VmHWM). Not ru_maxrss: after
    fork/vfork + exec that also holds the parent's RSS, which would swamp a small model's step."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # pragma: no cover - not Linux


def probe_spec(*, backbone: str, in_chans: int, img_size: int, batch_size: int, num_outputs: int, task: str,
               optimizer: str, momentum: float, freeze_embed: bool, freeze_pos_embed: bool,
               precision: str = "32-true", device: str = "cpu", steps: int = PROBE_STEPS,
               model_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    return dict(backbone=backbone, in_chans=in_chans, img_size=img_size, batch_size=batch_size,
                num_outputs=num_outputs, task=task, optimizer=optimizer, momentum=momentum,
                freeze_embed=freeze_embed, freeze_pos_embed=freeze_pos_embed, precision=precision,
                device=device, steps=steps, model_kwargs=model_kwargs or {})


def run_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the spec's model and run ``steps`` training steps in this process; returns the peak
    memory (see the module doc) and the optimizer's exact state size."""
    import torch

    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    # one unmeasured step of the same model first: kernel caches, thread pools and the code they
    # load are then in place, so every spec is measured from the same warm state
    _train_steps(spec, device, steps=1)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        reset_peak_rss()
        base = current_rss_bytes()
    report, state_bytes, per_param = _train_steps(spec, device, steps=spec["steps"])
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = peak_rss_bytes() - base
    return {"peak_memory_bytes": int(peak), "optimizer_state_bytes": state_bytes,
            "optimizer_state_bytes_per_param": per_param,
            "trainable_params": report.trainable_params, "frozen_params": report.frozen_params,
            "device": str(device)}


def _train_steps(spec: dict[str, Any], device, *, steps: int):
    """Build the spec's model, optimizer and batch, run ``steps`` steps; returns the freezing
    report and the optimizer's state size (everything else is freed on return)."""
    import torch

    from domainfm.backbones import create_backbone
    from plugins.sgd_ft.model import Classifier, apply_freezing, loss_fn
    from plugins.sgd_ft.optim import build_optimizer, optimizer_state_bytes, per_parameter_state_bytes

    torch.manual_seed(0)
    backbone = create_backbone(spec["backbone"], in_chans=spec["in_chans"], img_size=spec["img_size"], init="random",
                               **spec["model_kwargs"])
    model = Classifier(backbone, spec["num_outputs"]).to(device).train()
    report = apply_freezing(model, freeze_embed=spec["freeze_embed"], freeze_pos_embed=spec["freeze_pos_embed"])
    opt = build_optimizer(model.parameters(), spec["optimizer"], lr=1e-3, momentum=spec["momentum"])
    criterion = loss_fn(spec["task"])
    b, c, s = spec["batch_size"], spec["in_chans"], spec["img_size"]
    x = torch.randn(b, c, s, s, device=device)
    if spec["task"] == "multilabel":
        y = (torch.rand(b, spec["num_outputs"], device=device) > 0.5).float()
    else:
        y = torch.randint(0, spec["num_outputs"], (b,), device=device)
    autocast = spec["precision"].startswith("bf16")
    for _ in range(steps):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = criterion(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return report, optimizer_state_bytes(opt), per_parameter_state_bytes(opt)


# glibc: blocks above 64 KiB are mmap'ed and unmapped on free (and the threshold stays fixed), so
# the warm-up step's memory is given back before the baseline is read
_CHILD_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _measure_in_child(specs: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
    from domainfm.errors import DomainFMError

    env = dict(os.environ, HF_HUB_OFFLINE="1", **_CHILD_MALLOC_ENV)
    try:
        proc = subprocess.run([sys.executable, "-m", "plugins.sgd_ft.memory", json.dumps(specs)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise DomainFMError(f"the memory probe of {specs[0]['backbone']} took over {timeout:.0f} s",
                            fix="fine-tune with --no-measure-memory") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DomainFMError(f"the memory probe of {specs[0]['backbone']} failed ({tail[:300]})",
                            fix="fine-tune with --no-measure-memory, or check that the model fits in memory")
    return json.loads(lines[-1])


def measure_many(specs: list[dict[str, Any]], *, timeout: float = 1800.0, parallel: bool = True) -> list[dict[str, Any]]:
    """:func:`run_probe` for each spec, each in its own fresh Python process (clean resident-set
    accounting on CPU, a clean CUDA context on GPU); ``parallel`` runs the processes side by side
    (each has its own resident set, so they do not disturb each other's figures)."""
    if not specs:
        return []
    if not parallel or len(specs) == 1:
        return [_measure_in_child([s], timeout)[0] for s in specs]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(specs)) as pool:
        return list(pool.map(lambda s: _measure_in_child([s], timeout)[0], specs))


def measure(spec: dict[str, Any], *, timeout: float = 1800.0) -> dict[str, Any]:
    return measure_many([spec], timeout=timeout)[0]


# ---------------------------------------------------------------- per-run meter

class MemoryMeter:
    """Peak memory of a training step per (architecture, arm) on CPU, measured once and
    remembered, so a sweep does not repeat it for every learning rate. The first request measures
    every arm in ``planned`` at once (separate processes side by side)."""

    def __init__(self, cfg, dm, planned=()) -> None:
        self.cfg = cfg
        self.dm = dm
        self.planned = list(planned)
        self.cache: dict[str, dict[str, Any]] = {}

    def spec(self, backbone_name: str, arm: Arm) -> dict[str, Any]:
        return probe_spec(backbone=backbone_name, in_chans=self.dm.in_chans, img_size=self.cfg.img_size,
                          batch_size=self.cfg.batch_size, num_outputs=self.dm.num_outputs, task=self.dm.task,
                          optimizer=arm.optimizer, momentum=self.cfg.momentum, freeze_embed=arm.freeze_embed,
                          freeze_pos_embed=bool(self.cfg.freeze_pos_embed), precision=self.cfg.precision)

    def cpu_peak(self, backbone_name: str, arm: Arm) -> int | None:
        if not self.cfg.measure_memory:
            return None
        key = json.dumps(self.spec(backbone_name, arm), sort_keys=True)
        if key not in self.cache:
            specs = [self.spec(backbone_name, a) for a in dict.fromkeys([arm] + self.planned)]
            for s, r in zip(specs, measure_many(specs)):
                self.cache[json.dumps(s, sort_keys=True)] = r
        return int(self.cache[key]["peak_memory_bytes"])


if __name__ == "__main__":  # the child process of measure_many()
    print(json.dumps([run_probe(spec) for spec in json.loads(sys.argv[1])]), flush=True)
