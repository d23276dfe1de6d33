"""The optimizer arms sgd-ft trains and compares (Kumar et al.: SGD with a frozen embedding layer,
plain SGD, AdamW), and the learning rates of a sweep. Pure: nothing heavy imported."""

from __future__ import annotations

from dataclasses import dataclass

from domainfm.errors import DomainFMError


@dataclass(frozen=True)
class Arm:
    name: str
    optimizer: str
    freeze_embed: bool


COMPARE_ARMS = (Arm("sgd-frozen-embed", "sgd", True), Arm("sgd", "sgd", False), Arm("adamw", "adamw", False))


def arm_of(cfg) -> Arm:
    name = cfg.optimizer + ("-frozen-embed" if cfg.freeze_embed else "")
    return Arm(name, cfg.optimizer, bool(cfg.freeze_embed))


def parse_lr_sweep(text: str | None) -> list[float]:
    """``"1e-4,3e-4,1e-3"`` -> [1e-4, 3e-4, 1e-3] (order kept, duplicates dropped)."""
    if not text:
        return []
    out: list[float] = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            lr = float(part)
        except ValueError:
            raise DomainFMError(f"--lr-sweep has {part!r}, which is not a number",
                                fix="give comma-separated learning rates, e.g. --lr-sweep 1e-4,3e-4,1e-3") from None
        if not lr > 0:
            raise DomainFMError(f"--lr-sweep has {part!r}; learning rates must be positive",
                                fix="give comma-separated positive learning rates")
        if lr not in out:
            out.append(lr)
    return out
