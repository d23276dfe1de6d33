"""Peak memory of one fine-tuning step, measured the same way for every optimizer arm.

On CUDA: ``torch.cuda.max_memory_allocated`` over the steps (every tensor: weights, gradients,
optimizer state, activations). On CPU torch keeps no allocator statistics, and a process's peak
RSS only ever grows, so each measurement runs in a fresh Python process
(``python -m plugins.sgd_ft.memory SPEC_JSON``): the peak RSS after the steps minus the RSS before
the model was built (the address space's high-water mark, VmHWM). Weights are random (their values do not change the memory); the architecture,
bands, input size, batch size, head, freezing, optimizer and precision are those of the run.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from typing import Any

PROBE_STEPS = 2  # the first step allocates the optimizer state; the second runs with it in place


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


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


def _warm_up(device) -> None:
    """Load the libraries and kernels a step uses (timm, oneDNN/cuDNN code, thread pools) before
    the baseline is taken, so the measured growth is tensors, not code pages."""
    import timm  # noqa: F401 - imported for its code pages
    import torch
    from torch import nn

    tiny = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GELU(), nn.Flatten(1), nn.LayerNorm(8 * 30 * 30),
                         nn.Linear(8 * 30 * 30, 2)).to(device)
    for name in ("sgd", "adamw"):
        opt = torch.optim.SGD(tiny.parameters(), lr=0.1, momentum=0.9) if name == "sgd" else \
            torch.optim.AdamW(tiny.parameters())
        tiny(torch.randn(2, 3, 32, 32, device=device)).logsumexp(1).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    del tiny, opt


def run_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the spec's model and run ``steps`` training steps in this process; returns the peak
    memory (see the module doc) and the optimizer's exact state size."""
    import torch

    from domainfm.backbones import create_backbone
    from plugins.sgd_ft.model import Classifier, apply_freezing, loss_fn
    from plugins.sgd_ft.optim import build_optimizer, optimizer_state_bytes, per_parameter_state_bytes

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    _warm_up(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = current_rss_bytes()
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
    for _ in range(spec["steps"]):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = criterion(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = peak_rss_bytes() - base
    return {"peak_memory_bytes": int(peak), "optimizer_state_bytes": optimizer_state_bytes(opt),
            "optimizer_state_bytes_per_param": per_parameter_state_bytes(opt),
            "trainable_params": report.trainable_params, "frozen_params": report.frozen_params,
            "device": str(device)}


def measure(spec: dict[str, Any], *, timeout: float = 900.0) -> dict[str, Any]:
    """:func:`run_probe` in a fresh Python process (clean peak-RSS accounting on CPU, a clean
    CUDA context on GPU)."""
    from domainfm.errors import DomainFMError

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "plugins.sgd_ft.memory", json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DomainFMError(f"the memory probe of {spec['backbone']} failed ({tail[:300]})",
                            fix="fine-tune with --no-measure-memory, or check that the model fits in memory")
    return json.loads(lines[-1])


def measure_many(specs: list[dict[str, Any]], *, timeout: float = 900.0) -> list[dict[str, Any]]:
    """:func:`measure` for several specs, their processes running side by side (each process
    has its own RSS, so they do not disturb each other's figures)."""
    from concurrent.futures import ThreadPoolExecutor

    if not specs:
        return []
    with ThreadPoolExecutor(max_workers=len(specs)) as pool:
        return list(pool.map(lambda s: measure(s, timeout=timeout), specs))


if __name__ == "__main__":  # the child process of measure()
    print(json.dumps(run_probe(json.loads(sys.argv[1]))), flush=True)
